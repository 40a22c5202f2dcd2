"""A per-principal cap on requests in flight, shared by every ingress replica through Redis.

Without it one key holding slow uploads fills every replica's local cap (serve_app.security.
concurrency) and everyone else gets 503s. Each admitted request holds a *lease*: a member of the
principal's sorted set in Redis, scored by its expiry (concurrency_lease.lua acquires, renews and
releases atomically, on the Redis server's clock). The holder renews its lease every third of its
lifetime and releases it when the request ends; a replica that dies holding leases leaks them for
at most `lease_s`, never for good.

Failure policy: Redis down, slow or refusing -> fail OPEN: the request is admitted without a lease
(the gate counts it as aligner_ratelimit_decisions{policy="concurrency", result="error_allowed"}),
and only the per-replica local cap bounds it until Redis answers again. A failed renewal or
release is counted and otherwise ignored: the lease expires by itself.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from contextlib import asynccontextmanager
from typing import AsyncIterator

from redis.asyncio import Redis

from serve_app.security.redis_store import STORE_ERRORS, StoreHealth, load_script

logger = logging.getLogger(__name__)

KEY_PREFIX = "concurrency"


class ConcurrencyLimitReached(Exception):
    """The principal already holds `limit` leases."""

    def __init__(self, limit: int):
        super().__init__(f"already {limit} requests in flight")
        self.limit = limit


class PrincipalConcurrency:
    def __init__(self, redis: Redis, lease_s: float):
        self._script = load_script(redis, "concurrency_lease.lua")
        self.lease_s = lease_s  # live: applies to leases taken or renewed from now on
        self.store_health = StoreHealth(logger, "concurrency leases")

    @asynccontextmanager
    async def slot(self, principal_key: str, limit: int) -> AsyncIterator[bool]:
        """Hold one of `principal_key`'s `limit` leases for the body of the `async with`.

        Yields True when the lease is held in Redis, False when admitted because Redis failed.
        Raises ConcurrencyLimitReached (before the body runs) when all leases are taken.
        """
        key = f"{KEY_PREFIX}:{principal_key}"
        lease = secrets.token_hex(8)
        try:
            granted, _ = await self._call(key, "acquire", lease, limit)
        except STORE_ERRORS as error:
            self.store_health.failed(error, "admitting without the shared concurrency cap (fail open)")
            granted = None
        if granted is None:
            yield False
            return
        self.store_health.answered()
        if not granted:
            raise ConcurrencyLimitReached(limit)
        renewer = asyncio.create_task(self._keep_renewed(key, lease))
        try:
            yield True
        finally:
            renewer.cancel()
            try:
                await self._call(key, "release", lease)
            except STORE_ERRORS as error:
                self.store_health.failed(error, "leases expire by themselves")

    async def _keep_renewed(self, key: str, lease: str) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self._call(key, "renew", lease)
            except STORE_ERRORS as error:
                self.store_health.failed(error, "leases expire by themselves")

    async def _call(self, key: str, op: str, lease: str, limit: int = 0) -> tuple[bool, int]:
        granted, held = await self._script(keys=[key], args=[op, lease, limit, int(self.lease_s * 1000)])
        return bool(int(granted)), int(held)
