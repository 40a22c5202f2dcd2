"""The Aligner's backend turns: one batch at a time, a waiting request batch before any job window."""

from __future__ import annotations

import asyncio

import pytest

from deployments.aligner import BackendTurns


async def _take(turns: BackendTurns, order: list[str], name: str, background: bool, hold_s: float) -> None:
    async with turns.hold(background):
        order.append(name)
        await asyncio.sleep(hold_s)


@pytest.mark.asyncio
async def test_a_waiting_request_batch_goes_before_waiting_job_windows():
    turns, order = BackendTurns(), []
    running = asyncio.create_task(_take(turns, order, "window 1", True, 0.2))
    await asyncio.sleep(0.02)
    queued = [asyncio.create_task(_take(turns, order, f"window {n}", True, 0.0)) for n in (2, 3)]
    await asyncio.sleep(0.02)
    request = asyncio.create_task(_take(turns, order, "request", False, 0.0))
    await asyncio.gather(running, *queued, request)
    assert order == ["window 1", "request", "window 2", "window 3"]  # the running window is never preempted
    assert not turns.busy


@pytest.mark.asyncio
async def test_job_windows_run_whenever_no_request_waits():
    turns, order = BackendTurns(), []
    await asyncio.gather(*(_take(turns, order, f"window {n}", True, 0.01) for n in range(3)))
    assert sorted(order) == ["window 0", "window 1", "window 2"]
