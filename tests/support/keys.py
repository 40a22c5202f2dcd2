"""Create or revoke a real API key in a Redis, as `serve_app.cli keys` would (tests and bench/)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from serve_app.security.api_keys import ApiKeyStore
from serve_app.security.redis_store import request_path_client


def create_api_key(
    redis_url: str, pepper: bytes, owner: str, scopes: Sequence[str], plan: str, expires_in_s: float | None = None
) -> str:
    async def create() -> str:
        redis = request_path_client(redis_url)
        try:
            text, _ = await ApiKeyStore(redis, pepper).create(owner, scopes, plan, expires_in_s)
            return text
        finally:
            await redis.aclose()

    return asyncio.run(create())


def revoke_api_key(redis_url: str, pepper: bytes, key_id: str) -> None:
    """Revoke a key in a Redis, as `serve_app.cli keys revoke` would."""

    async def revoke() -> None:
        redis = request_path_client(redis_url)
        try:
            await ApiKeyStore(redis, pepper).revoke(key_id)
        finally:
            await redis.aclose()

    asyncio.run(revoke())


def mistyped(key: str) -> str:
    """`key` with its last character replaced by a different one, so its checksum fails.

    Never "replace it with x": about 1 key in 62 already ends in x, and the "mistyped" key is then
    the real one (a test that failed once in ~62 runs).
    """
    last = key[-1]
    return key[:-1] + ("A" if last != "A" else "B")
