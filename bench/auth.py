"""Latency of the authentication step alone: Authenticator.authenticate + authorize, warm caches.

    .venv/bin/python -m bench.auth [--iterations 5000]

Starts its own redis-server (tools.local_services) and loopback OAuth2 issuer
(tests.support.issuer), so it measures the real verifiers: an API key (cached record, HMAC,
constant-time compare) and an RS256 JWT (full signature and claims check on every call; JWKS
cached). Targets: API key p50 <= 0.3 ms, JWT p50 <= 0.5 ms. For scale it also times an API key
with the cache off (one Redis round trip per call: what a cache miss costs, every cache_s).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from redis.asyncio import Redis

from serve_app.security.api_keys import ApiKeyStore, ApiKeyVerifier
from serve_app.security.authenticate import Authenticator
from serve_app.security.oauth import JwtVerifier
from serve_app.settings import IngressOptions, OAuthIssuer, OAuthOptions
from tests.support.issuer import AUDIENCE, LoopbackIssuer
from tools.local_services import RedisServer

TARGET_P50_MS = {"api_key": 0.3, "jwt_rs256": 0.5}
PEPPER = b"bench-pepper-not-for-production"


async def _time(authenticator: Authenticator, headers: dict[str, str], iterations: int) -> list[float]:
    for _ in range(100):  # warm caches and code paths
        authenticator.authorize(await authenticator.authenticate(headers), "align")
    samples_ms = []
    for _ in range(iterations):
        started = time.perf_counter()
        authenticator.authorize(await authenticator.authenticate(headers), "align")
        samples_ms.append((time.perf_counter() - started) * 1000)
    return samples_ms


def _report(name: str, samples_ms: list[float]) -> bool:
    ordered = sorted(samples_ms)
    p50 = statistics.median(ordered)
    p99 = ordered[int(len(ordered) * 0.99) - 1]
    target_ms = TARGET_P50_MS.get(name)
    met = target_ms is None or p50 <= target_ms
    verdict = "no target" if target_ms is None else f"target p50 <= {target_ms} ms: {'met' if met else 'NOT met'}"
    print(f"{name:16s} p50 {p50:.3f} ms  p99 {p99:.3f} ms  ({verdict})")
    return met


async def _bench(redis_url: str, issuer: LoopbackIssuer, iterations: int) -> bool:
    redis = Redis.from_url(redis_url)
    store = ApiKeyStore(redis, PEPPER)
    api_key, _ = await store.create("bench", ["align"], "standard")
    token = issuer.mint(issuer.access_token_claims("bench-client", "align"))
    async with httpx.AsyncClient() as http:
        options = OAuthOptions(issuers=[OAuthIssuer(issuer=issuer.issuer, audience=AUDIENCE)])
        authenticator = Authenticator(
            ApiKeyVerifier(store, cache_s=IngressOptions().api_key_cache_s), JwtVerifier(options, http)
        )
        print(f"{iterations} iterations each, one coroutine, warm caches")
        results = [
            _report("api_key", await _time(authenticator, {"x-api-key": api_key}, iterations)),
            _report("jwt_rs256", await _time(authenticator, {"authorization": f"Bearer {token}"}, iterations)),
        ]
        uncached = Authenticator(ApiKeyVerifier(store, cache_s=0), jwt=None)
        _report("api_key_uncached", await _time(uncached, {"x-api-key": api_key}, iterations))
    await store.flush_last_used()
    await redis.aclose()
    return all(results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5000)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        redis_server = RedisServer(Path(directory)).start()
        issuer = LoopbackIssuer().start()
        try:
            met = asyncio.run(_bench(redis_server.url, issuer, arguments.iterations))
        finally:
            issuer.stop()
            redis_server.stop()
    print("all targets met" if met else "some targets NOT met")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
