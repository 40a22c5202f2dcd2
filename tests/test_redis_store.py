"""The request path's Redis client against a real redis-server that restarts or freezes."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from serve_app.security.redis_store import request_path_client, stop_if_cancelled

pytestmark = pytest.mark.asyncio


async def test_a_pooled_connection_gone_stale_across_a_restart_is_retried_not_failed(private_redis_server):
    async with request_path_client(private_redis_server.url) as client:
        await client.set("survives", "1")  # leaves a connection in the pool
        private_redis_server.stop()
        private_redis_server.start()
        assert await client.get("survives") == "1"  # the stale connection failed; the retry answered


async def test_a_frozen_redis_costs_a_bounded_wait_not_a_hang(private_redis_server):
    timeout_s = 1.0
    async with request_path_client(private_redis_server.url, timeout_s=timeout_s) as client:
        await client.ping()
        os.kill(private_redis_server.process.pid, signal.SIGSTOP)  # accepts connections, never answers
        try:
            started = time.monotonic()
            with pytest.raises(Exception) as caught:
                await client.get("anything")
            elapsed_s = time.monotonic() - started
        finally:
            os.kill(private_redis_server.process.pid, signal.SIGCONT)
    assert type(caught.value).__name__ == "TimeoutError"
    # One try and its one retry, each cut at timeout_s (redis-py's defaults would wait forever).
    assert timeout_s <= elapsed_s < 2 * timeout_s + 0.5


async def test_a_loop_whose_call_lost_its_cancellation_still_stops():
    started = asyncio.Event()

    async def call_that_loses_a_cancellation():  # what redis-py 8.1 does now and then under load
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            return None

    async def loop():
        while True:
            await call_that_loses_a_cancellation()
            stop_if_cancelled()

    task = asyncio.create_task(loop())
    await started.wait()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done == {task} and task.cancelled()


async def test_a_task_not_cancelled_goes_on():
    stop_if_cancelled()  # raises nothing
    assert not asyncio.current_task().cancelling()
