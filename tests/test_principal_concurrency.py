"""The per-principal concurrency cap shared by ingress replicas, against a real redis-server.

Two clients with their own connection pools stand in for two ingress replicas. Each test uses its
own principal key, so tests share the session's Redis; the outage test stops a Redis of its own.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import AsyncExitStack

import pytest
import pytest_asyncio

from serve_app.security.principal_concurrency import KEY_PREFIX, ConcurrencyLimitReached, PrincipalConcurrency
from serve_app.security.redis_store import request_path_client


@pytest_asyncio.fixture
async def replicas(redis_server):
    clients = [request_path_client(redis_server.url) for _ in range(2)]
    yield clients
    for client in clients:
        await client.aclose()


def principal() -> str:
    return f"api_key:k_{uuid.uuid4().hex[:12]}"


@pytest.mark.asyncio
async def test_the_cap_is_shared_across_replicas_and_freed_on_exit(replicas, redis_client):
    first, second = (PrincipalConcurrency(client, lease_s=30) for client in replicas)
    key = principal()
    async with AsyncExitStack() as held:
        for caps in (first, second, first):
            assert await held.enter_async_context(caps.slot(key, 3)) is True
        with pytest.raises(ConcurrencyLimitReached):
            async with second.slot(key, 3):
                pass
        async with first.slot(principal(), 3):  # another principal is not affected
            pass
        assert await redis_client.zcard(f"{KEY_PREFIX}:{key}") == 3
    assert await redis_client.exists(f"{KEY_PREFIX}:{key}") == 0  # released, nothing left behind
    async with second.slot(key, 3):
        pass


@pytest.mark.asyncio
async def test_a_failing_request_releases_its_lease(redis_client):
    caps = PrincipalConcurrency(redis_client, lease_s=30)
    key = principal()
    with pytest.raises(RuntimeError):
        async with caps.slot(key, 1):
            raise RuntimeError("the request failed")
    async with caps.slot(key, 1):
        pass


@pytest.mark.asyncio
async def test_a_dead_replicas_leases_expire_and_a_live_holder_keeps_renewing(replicas):
    live, dead = PrincipalConcurrency(replicas[0], lease_s=1.5), PrincipalConcurrency(replicas[1], lease_s=1.5)
    key = principal()
    # What a replica that died mid-request leaves behind: a lease taken, never renewed nor released.
    assert await dead._call(f"{KEY_PREFIX}:{key}", "acquire", "lease-of-a-dead-replica", 2) == (True, 1)
    async with live.slot(key, 2):
        with pytest.raises(ConcurrencyLimitReached):
            async with live.slot(key, 2):
                pass
        await asyncio.sleep(2.2)  # past the lease lifetime: the live lease was renewed, the dead one not
        async with live.slot(key, 2):  # the dead replica's slot is free again
            with pytest.raises(ConcurrencyLimitReached):  # and the live holder's lease still counts
                async with live.slot(key, 2):
                    pass


@pytest.mark.asyncio
async def test_redis_down_fails_open_fast_and_is_counted(private_redis_server):
    async with request_path_client(private_redis_server.url) as client:
        caps = PrincipalConcurrency(client, lease_s=30)
        key = principal()
        async with caps.slot(key, 1) as shared:
            assert shared is True
        private_redis_server.stop()
        try:
            started = time.monotonic()
            async with caps.slot(key, 1) as first, caps.slot(key, 1) as second:
                assert (first, second) == (False, False)  # admitted without a lease
            assert time.monotonic() - started < 2.0
            assert caps.store_health.failures == 2
        finally:
            private_redis_server.start()
        async with caps.slot(key, 1) as shared:
            assert shared is True
