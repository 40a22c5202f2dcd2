"""Continuous batching (deployments.batching): no wait at an idle backend, arrivals form the next batch."""

from __future__ import annotations

import asyncio
import time

import pytest

from deployments.batching import BatchLimits, ContinuousBatcher

LIMITS = BatchLimits(max_jobs=4, max_seconds=100.0, max_background_jobs=2)


class Backend:
    """Records each batch; the first `held` batches wait for `release` (a batch "running")."""

    def __init__(self, held: int = 0) -> None:
        self.batches: list[list[str]] = []
        self.release = asyncio.Event()
        self._held = held

    async def run(self, jobs: list[tuple[str, float]]) -> list[str]:
        self.batches.append([name for name, _ in jobs])
        if len(self.batches) <= self._held:
            await self.release.wait()
        return [f"{name} done" for name, _ in jobs]


def batcher_for(backend: Backend, limits: BatchLimits = LIMITS, waits: list | None = None) -> ContinuousBatcher:
    observe = (lambda seconds, background: waits.append((seconds, background))) if waits is not None else (lambda *_: None)
    return ContinuousBatcher(backend.run, lambda job: job[1], limits, observe)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def one_running_then_queued(batcher: ContinuousBatcher, queued: int) -> list[asyncio.Task]:
    """Job j0 running alone, then j1..j<queued> submitted while it runs."""
    tasks = [asyncio.create_task(batcher.submit(("j0", 1.0)))]
    await settle()
    tasks += [asyncio.create_task(batcher.submit((f"j{n}", 1.0))) for n in range(1, queued + 1)]
    await settle()
    return tasks


@pytest.mark.asyncio
async def test_a_job_at_an_idle_batcher_starts_at_once_and_alone():
    backend, waits = Backend(), []
    batcher = batcher_for(backend, waits=waits)
    assert await batcher.submit(("a", 1.0)) == "a done"
    assert backend.batches == [["a"]]
    ((waited, background),) = waits
    assert waited < 0.02 and not background  # no batch timeout waited out
    assert not batcher.busy


@pytest.mark.asyncio
async def test_jobs_arriving_while_a_batch_runs_form_the_next_batch():
    backend = Backend(held=1)
    batcher = batcher_for(backend)
    tasks = await one_running_then_queued(batcher, 3)
    assert backend.batches == [["j0"]] and batcher.queued() == 3 and batcher.running == 1
    assert batcher.idle_wait_s() == 0.0  # queued behind a running batch is not a batch wait
    backend.release.set()
    assert await asyncio.gather(*tasks) == ["j0 done", "j1 done", "j2 done", "j3 done"]
    assert backend.batches == [["j0"], ["j1", "j2", "j3"]]


@pytest.mark.asyncio
async def test_a_stalled_event_loop_reads_as_a_wait_for_a_batch():
    batcher = batcher_for(Backend())
    task = asyncio.create_task(batcher.submit(("a", 1.0)))
    await asyncio.sleep(0)  # queued; its batch cannot start while the loop is blocked
    time.sleep(0.05)
    assert batcher.idle_wait_s() >= 0.05 and batcher.queued() == 1
    await task
    assert batcher.idle_wait_s() == 0.0 and batcher.queued() == 0


@pytest.mark.asyncio
async def test_a_batch_holds_at_most_max_jobs_in_arrival_order():
    backend = Backend(held=1)
    tasks = await one_running_then_queued(batcher_for(backend), 10)
    backend.release.set()
    await asyncio.gather(*tasks)
    assert backend.batches == [["j0"], ["j1", "j2", "j3", "j4"], ["j5", "j6", "j7", "j8"], ["j9", "j10"]]


@pytest.mark.asyncio
async def test_a_batch_holds_at_most_max_seconds_and_a_longer_job_runs_alone():
    backend = Backend(held=1)
    batcher = batcher_for(backend, BatchLimits(max_jobs=8, max_seconds=10.0, max_background_jobs=8))
    running = asyncio.create_task(batcher.submit(("first", 1.0)))
    await settle()
    sized = [("a", 4.0), ("b", 5.0), ("c", 2.0), ("long", 30.0), ("d", 1.0), ("e", 1.0)]
    tasks = [asyncio.create_task(batcher.submit(job)) for job in sized]
    await settle()
    backend.release.set()
    await asyncio.gather(running, *tasks)
    # c does not fit after a+b (11 s): it starts the next batch, never overtaken by later jobs
    assert backend.batches == [["first"], ["a", "b"], ["c"], ["long"], ["d", "e"]]


@pytest.mark.asyncio
async def test_requests_go_before_queued_background_work_which_is_never_preempted():
    backend, waits = Backend(held=1), []
    batcher = batcher_for(backend, waits=waits)
    running = asyncio.create_task(batcher.submit(("w0", 1.0), background=True))
    await settle()
    windows = [asyncio.create_task(batcher.submit((f"w{n}", 1.0), background=True)) for n in (1, 2, 3)]
    await settle()
    request = asyncio.create_task(batcher.submit(("request", 1.0)))
    await settle()
    backend.release.set()
    await asyncio.gather(running, *windows, request)
    assert backend.batches == [["w0"], ["request"], ["w1", "w2"], ["w3"]]  # max_background_jobs 2
    assert [background for _, background in waits] == [True, False, True, True, True]


@pytest.mark.asyncio
async def test_a_failing_batch_fails_each_of_its_jobs_and_the_next_batch_runs():
    class Broken(Backend):
        async def run(self, jobs):
            if any(name == "poison" for name, _ in jobs):
                raise RuntimeError("backend broke")
            return await super().run(jobs)

    backend = Broken()
    batcher = batcher_for(backend)
    blocker = asyncio.create_task(batcher.submit(("poison", 1.0)))
    followers = [asyncio.create_task(batcher.submit((name, 1.0))) for name in ("x", "poison")]
    results = await asyncio.gather(blocker, *followers, return_exceptions=True)
    assert all(isinstance(result, RuntimeError) for result in results)
    assert await batcher.submit(("fine", 1.0)) == "fine done"


@pytest.mark.asyncio
async def test_a_wrong_number_of_outcomes_fails_every_job_of_the_batch():
    async def short_by_one(jobs):
        return ["only one"]

    batcher = ContinuousBatcher(short_by_one, lambda job: 1.0, LIMITS)
    results = await asyncio.gather(*(batcher.submit(n) for n in range(3)), return_exceptions=True)
    assert all(isinstance(result, RuntimeError) and "1 outcomes for 3 jobs" in str(result) for result in results)
    assert await batcher.submit(9) == "only one"  # a batch of one gets its one outcome


@pytest.mark.asyncio
async def test_a_caller_that_gave_up_while_queued_is_left_out_of_the_batch():
    backend = Backend(held=1)
    batcher = batcher_for(backend)
    running, quitter, stayer = await one_running_then_queued(batcher, 2)
    quitter.cancel()
    await settle()
    assert batcher.queued() == 1
    backend.release.set()
    await asyncio.gather(running, stayer)
    assert backend.batches == [["j0"], ["j2"]]


@pytest.mark.asyncio
async def test_new_limits_apply_from_the_next_batch():
    backend = Backend(held=1)
    batcher = batcher_for(backend)
    tasks = await one_running_then_queued(batcher, 4)
    batcher.limits = BatchLimits(max_jobs=2, max_seconds=100.0, max_background_jobs=2)
    backend.release.set()
    await asyncio.gather(*tasks)
    assert backend.batches == [["j0"], ["j1", "j2"], ["j3", "j4"]]


def test_limits_must_be_positive():
    for limits in ((0, 1.0, 1), (1, 0.0, 1), (1, 1.0, 0)):
        with pytest.raises(ValueError):
            BatchLimits(*limits)
