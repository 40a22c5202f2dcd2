"""Redis outages (issue 10, point 11): what clients see while Redis is away, and how fast Sentinel
brings writes back.

    .venv/bin/python -m bench.redis_outage [--rounds 3] [--outage-s 60] [--clients 6] [--sentinel-rounds 3] [--call-repeats 20]

0. What each Redis call of the request path costs when Redis is stopped (connections refused) and
   when it is frozen (SIGSTOP: connections accepted, never answered), through
   redis_store.request_path_client with its defaults (0.25 s timeouts, one retry): the ban check,
   the pre-auth and request buckets, an API key verification (served from the stale copy), the
   abuse record and the last-used flush. Median over `--call-repeats` calls each.
1. Sentinel, against the store layer directly (not the Serve graph: deploying the graph on Sentinel
   would add a cluster start per round and measure nothing the store layer does not): a primary, a
   replica and three sentinels (tools.local_services.RedisSentinelSetup, down-after 1 s). A loop
   makes the request path's writes every 50 ms (a token-bucket take and a last-used flush, through
   redis_store.request_path_client on the sentinels); the primary is stopped; printed: seconds until
   both writes succeed again (target <= 10 s).
2. The real graph (configs/serve.yaml, PocketSphinx backend, the bench plan so no bucket is the limit
   measured): `--clients` threads, one API key each, POST /v1/align in a loop with a 2.9 s eval clip.
   Each round: 10 s with Redis up (every key freshly verified), Redis stopped for `--outage-s`,
   10 s after its restart. Printed per round: the share of outage requests answered 200 (target
   >= 99 %), latency p50 and p95 before and during, and what a never-seen key got during the outage
   (must be 503). Then the median and range over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.stack import BENCH_PLAN, Stack, with_bench_plan
from serve_app.security.abuse import AbuseMonitor
from serve_app.security.api_keys import ApiKeyStore, ApiKeyVerifier
from serve_app.security.ratelimit import RateLimiter, TokenBucketLimiter
from serve_app.security.redis_store import STORE_ERRORS, request_path_client
from serve_app.settings import AbuseOptions, Plan, RateLimitOptions, RedisSentinel
from tests.support.cluster import ROOT, application_from_yaml, start_ray, start_serve
from tools.local_services import SENTINEL_SERVICE, RedisSentinelSetup, RedisServer

CLIP = ROOT.parent / "shared" / "eval" / "emuR_ae" / "msajc003.wav"
TRANSCRIPT = "amongst her friends she was considered beautiful"
SUCCESS_TARGET = 0.99
FAILOVER_TARGET_S = 10.0
SETTLE_S = 10.0  # before and after each outage
PEPPER = b"bench-redis-outage-pepper-0001"


# -- 0. cost of each request-path call while Redis is away ----------------------------------------


async def _call_costs(server: RedisServer, repeats: int) -> dict[str, dict[str, float]]:
    client = request_path_client(server.url)
    store = ApiKeyStore(client, PEPPER, last_used_flush_s=3600)
    verifier = ApiKeyVerifier(store, cache_s=0, stale_s=600)
    limiter, abuse = RateLimiter(TokenBucketLimiter(client), RateLimitOptions()), AbuseMonitor(client, AbuseOptions(allow_networks=[]))
    text, record = await store.create("bench-calls", ["align"], "standard")
    principal = await verifier.verify(text)
    ip = "203.0.113.9"
    calls = {
        "ban check": lambda: abuse.is_banned(ip, f"api_key:{record.key_id}"),
        "pre-auth bucket": lambda: limiter.take_pre_auth(ip),
        "key verification": lambda: verifier.verify(text),
        "request bucket": lambda: limiter.take_request(principal, Plan()),
        "abuse record": lambda: abuse.record("auth_failure", ip),
        "last-used flush": lambda: (store.record_use(record.key_id), store.flush_last_used())[1],
    }

    async def median_s() -> dict[str, float]:
        costs = {}
        for name, call in calls.items():
            timings = []
            for _ in range(repeats):
                started = time.perf_counter()
                await call()
                timings.append(time.perf_counter() - started)
            costs[name] = statistics.median(timings)
        return costs

    results = {"up": await median_s()}
    pid = server.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        results["frozen"] = await median_s()
    finally:
        os.kill(pid, signal.SIGCONT)
    server.stop()
    results["stopped"] = await median_s()
    await client.aclose()
    return results


def call_costs(repeats: int) -> None:
    server = RedisServer(Path(tempfile.mkdtemp(prefix="bench-calls-"))).start()
    try:
        results = asyncio.run(_call_costs(server, repeats))
    finally:
        server.stop()
    print(f"request-path Redis calls, median of {repeats} (ms): " + ", ".join(results))
    for name in results["up"]:
        print(f"  {name:>17}: " + " / ".join(f"{results[state][name] * 1000:7.2f}" for state in results))
    print()


# -- 1. Sentinel failover, store layer -----------------------------------------------------------


async def _writes_succeed(limiter: TokenBucketLimiter, store: ApiKeyStore, key_id: str) -> bool:
    try:
        await limiter.take(f"bench-failover-{key_id}", capacity=1e6, refill_per_s=1e6)
        store.record_use(key_id)
        return await store.flush_last_used() == 1
    except STORE_ERRORS:
        return False


async def _failover_seconds(setup: RedisSentinelSetup) -> float:
    client = request_path_client("redis://127.0.0.1:1/0", sentinel=RedisSentinel(addresses=setup.addresses, service_name=SENTINEL_SERVICE))
    try:
        store, limiter = ApiKeyStore(client, PEPPER), TokenBucketLimiter(client)
        _, record = await store.create("bench-failover", ["align"], "standard")
        if not await _writes_succeed(limiter, store, record.key_id):
            raise RuntimeError("writes fail before the primary was stopped")
        setup.primary.stop()
        stopped_at = time.monotonic()
        while not await _writes_succeed(limiter, store, record.key_id):
            if time.monotonic() - stopped_at > 60:
                raise RuntimeError("no failover within 60 s")
            await asyncio.sleep(0.05)
        return time.monotonic() - stopped_at
    finally:
        await client.aclose()


def sentinel_rounds(rounds: int) -> list[float]:
    results = []
    for round_number in range(1, rounds + 1):
        setup = RedisSentinelSetup(Path(tempfile.mkdtemp(prefix="bench-sentinel-"))).start()
        try:
            seconds = asyncio.run(_failover_seconds(setup))
        finally:
            setup.stop()
        results.append(seconds)
        print(f"sentinel round {round_number}: primary stopped -> token-bucket take and last-used flush back after {seconds:.2f} s")
    return results


# -- 2. Redis stopped under load, through the graph ----------------------------------------------


@dataclass
class Answer:
    sent_at: float
    seconds: float
    status: int  # 0: no HTTP answer (transport error)
    problem: str = ""  # the problem type's last path segment, for answers that are not 200


@dataclass
class Load:
    url: str
    keys: list[str]
    audio: bytes
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _client_loop(self, key: str) -> None:
        with httpx.Client(base_url=self.url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = client.post("/v1/align", files={"audio": ("clip.wav", self.audio)}, data={"text": TRANSCRIPT})
                    status, problem = response.status_code, _problem_type(response)
                except httpx.HTTPError:
                    status, problem = 0, "transport-error"
                with self._lock:
                    self.answers.append(Answer(started, time.monotonic() - started, status, problem))

    def __enter__(self) -> "Load":
        self._threads = [threading.Thread(target=self._client_loop, args=(key,), daemon=True) for key in self.keys]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(150)

    def between(self, start: float, end: float) -> list[Answer]:
        with self._lock:
            return [answer for answer in self.answers if start <= answer.sent_at < end]


def _problem_type(response: httpx.Response) -> str:
    if response.status_code == 200:
        return ""
    try:
        return str(response.json().get("type", "")).rsplit("/", 1)[-1].rsplit("#", 1)[-1]
    except ValueError:
        return "not-a-problem-document"


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def outage_round(stack: Stack, load: Load, outage_s: float, round_number: int) -> float:
    time.sleep(SETTLE_S)
    before_start, outage_start = time.monotonic() - SETTLE_S, time.monotonic()
    stack.redis.stop()
    try:
        time.sleep(outage_s / 2)
        unseen_key = _never_seen_key(load.keys[0])
        with httpx.Client(base_url=load.url, timeout=30, headers={"Authorization": f"Bearer {unseen_key}"}) as client:
            unseen_status = client.post("/v1/align", files={"audio": ("clip.wav", load.audio)}, data={"text": TRANSCRIPT}).status_code
        time.sleep(outage_s - (time.monotonic() - outage_start))
    finally:
        stack.redis.start()
    outage_end = time.monotonic()
    time.sleep(SETTLE_S)
    before = load.between(before_start, outage_start)
    during = load.between(outage_start, outage_end)
    after = load.between(outage_end, time.monotonic())
    ok = sum(answer.status == 200 for answer in during)
    share = ok / len(during) if during else 0.0
    print(
        f"round {round_number}: Redis stopped {outage_end - outage_start:.0f} s, {len(load.keys)} clients: "
        f"{ok}/{len(during)} answered 200 ({share:.1%}); others {dict(Counter(f'{a.status} {a.problem}' for a in during if a.status != 200))}; "
        f"latency p50/p95 before {statistics.median(a.seconds for a in before):.2f}/{_percentile([a.seconds for a in before], 0.95):.2f} s, "
        f"during {statistics.median(a.seconds for a in during):.2f}/{_percentile([a.seconds for a in during], 0.95):.2f} s; "
        f"a never-seen key got {unseen_status}; after restart {sum(a.status == 200 for a in after)}/{len(after)} ok"
    )
    return share


def _never_seen_key(known: str) -> str:
    """A well-formed key (right shape and checksum) with an id no replica has looked up."""
    from serve_app.security.api_keys import format_api_key, parse_api_key

    parsed = parse_api_key(known)
    assert parsed is not None
    return format_api_key(parsed.key_id[::-1], parsed.secret)


def _outage_app(app: dict) -> None:
    """The shipped graph with the bench plan and the PocketSphinx backend; every other setting, load
    shedding and api_key_stale_s included, is the YAML's."""
    with_bench_plan(app)["args"].update(backend="pocketsphinx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--outage-s", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--sentinel-rounds", type=int, default=3)
    parser.add_argument("--call-repeats", type=int, default=20, help="0 skips part 0")
    arguments = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)

    if arguments.call_repeats:
        call_costs(arguments.call_repeats)

    failovers = sentinel_rounds(arguments.sentinel_rounds)
    if failovers:
        print(
            f"sentinel: writes back after median {statistics.median(failovers):.2f} s "
            f"(range {min(failovers):.2f}-{max(failovers):.2f} s, target <= {FAILOVER_TARGET_S:.0f} s) "
            f"-> {'PASS' if max(failovers) <= FAILOVER_TARGET_S else 'FAIL'}\n"
        )
    if arguments.rounds == 0:
        return

    stack = Stack()
    keys = [stack.api_key(BENCH_PLAN) for _ in range(arguments.clients)]
    start_ray()
    url = start_serve([application_from_yaml("aligner", "/", _outage_app)])
    audio = CLIP.read_bytes()
    with Load(url, keys, audio) as load:
        shares = [outage_round(stack, load, arguments.outage_s, number) for number in range(1, arguments.rounds + 1)]
    print(
        f"\ngraph: requests from recently verified keys answered 200 during the outage: median {statistics.median(shares):.1%} "
        f"(range {min(shares):.1%}-{max(shares):.1%}, target >= {SUCCESS_TARGET:.0%}) "
        f"-> {'PASS' if min(shares) >= SUCCESS_TARGET else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
