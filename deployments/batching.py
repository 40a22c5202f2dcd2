"""Continuous batching: a batch starts as soon as the backend is free; what arrives meanwhile forms the next.

A job that reaches an idle batcher runs at once, alone: nothing waits for company that may never
come. While a batch runs, arrivals queue, and the moment it ends the queue (up to the limits)
becomes the next batch. Under load batches fill by themselves; at low load nobody pays a wait.

Why not `@serve.batch` (Ray 2.60): its loop cuts the next batch as soon as the previous one was
*cut*, not when it *ended*. With `max_concurrent_batches=1` the later batches wait for the running
one, but they are already formed: with `batch_wait_timeout_s=0` every request becomes a batch of
one, and with a timeout a lone request always waits it out. Its `batch_size_fn` bounds one measure
only (a batch here is bounded by count and by audio seconds), and a job that does not fit is put
back at the end of the queue, behind later arrivals. One small queue here does all of it.

Two classes of work share the backend: requests (POST /v1/align) and background work (the windows
of asynchronous jobs). A batch is drawn from the requests whenever any wait; background work runs
only when none does, so it delays a request by at most the one batch already running.

Limits (`BatchLimits`, live): a batch holds at most `max_jobs` jobs (`max_background_jobs` for
background work) and at most `max_seconds` of audio; a single job longer than that runs alone
(the backend's own window limit bounds it). Jobs are taken in arrival order; the first that does
not fit ends the batch, so no job is overtaken.

Failure policy: `run_batch` answers one outcome per job. If it raises, or answers a different
number of outcomes, every job of that batch gets the error, so no caller hangs, and the batcher
goes on with the next batch. A caller that gives up while queued (its call cancelled) is dropped
before its batch is formed; one that gives up while its batch runs only loses the answer.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Job = TypeVar("Job")
Outcome = TypeVar("Outcome")


@dataclass(frozen=True)
class BatchLimits:
    max_jobs: int
    max_seconds: float
    max_background_jobs: int

    def __post_init__(self) -> None:
        if min(self.max_jobs, self.max_background_jobs) < 1 or not self.max_seconds > 0:
            raise ValueError(f"batch limits must be positive: {self}")


@dataclass
class _Entry(Generic[Job]):
    job: Job
    seconds: float
    answer: asyncio.Future
    arrived: float  # time.monotonic()


class ContinuousBatcher(Generic[Job, Outcome]):
    """Runs `run_batch` on one batch of submitted jobs at a time (see the module docstring)."""

    def __init__(
        self,
        run_batch: Callable[[list[Job]], Awaitable[Sequence[Outcome]]],
        seconds_of: Callable[[Job], float],
        limits: BatchLimits,
        observe_wait: Callable[[float, bool], None] = lambda seconds, background: None,
    ) -> None:
        """`observe_wait(seconds, background)`: told, for each job as its batch starts, how long it waited."""
        self._run_batch = run_batch
        self._seconds_of = seconds_of
        self._observe_wait = observe_wait
        self.limits = limits  # replaced whole by the owner's reconfigure; read once per batch
        self._requests: deque[_Entry[Job]] = deque()
        self._background: deque[_Entry[Job]] = deque()
        self._worker: asyncio.Task | None = None
        self.running = 0  # jobs in the batch being run
        self.free_since = time.monotonic()  # when the last batch ended

    async def submit(self, job: Job, background: bool = False) -> Outcome:
        """The job's outcome, once the batch it joined has run."""
        answer = asyncio.get_running_loop().create_future()
        (self._background if background else self._requests).append(_Entry(job, self._seconds_of(job), answer, time.monotonic()))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await answer  # cancelling the caller cancels `answer`: the batch forming skips it

    @property
    def busy(self) -> bool:
        return self._worker is not None and not self._worker.done()

    def queued(self) -> int:
        """Jobs waiting for a batch."""
        return sum(not entry.answer.done() for entry in (*self._requests, *self._background))

    def idle_wait_s(self) -> float:
        """How long the oldest queued job has waited while no batch ran (0 while one runs).

        A job behind a running batch is queued work, not a wait for a batch; a wait while nothing
        runs means the event loop itself is stalled."""
        waiting = [entry.arrived for entry in (*self._requests, *self._background) if not entry.answer.done()]
        if self.running or not waiting:
            return 0.0
        return time.monotonic() - max(min(waiting), self.free_since)

    async def _drain(self) -> None:
        """Run batches until nothing is queued; `submit` starts this again on the next arrival."""
        while batch := self._next_batch():
            await self._run(batch)

    def _next_batch(self) -> list[_Entry[Job]]:
        limits = self.limits
        for background, queue, max_jobs in ((False, self._requests, limits.max_jobs), (True, self._background, limits.max_background_jobs)):
            batch: list[_Entry[Job]] = []
            seconds = 0.0
            while queue and len(batch) < max_jobs:
                entry = queue[0]
                if entry.answer.done():  # its caller gave up
                    queue.popleft()
                    continue
                if batch and seconds + entry.seconds > limits.max_seconds:
                    break
                batch.append(queue.popleft())
                seconds += entry.seconds
            if batch:
                now = time.monotonic()
                for entry in batch:
                    self._observe_wait(now - entry.arrived, background)
                return batch
        return []

    async def _run(self, batch: list[_Entry[Job]]) -> None:
        self.running = len(batch)
        try:
            outcomes = list(await self._run_batch([entry.job for entry in batch]))
            if len(outcomes) != len(batch):
                raise RuntimeError(f"run_batch answered {len(outcomes)} outcomes for {len(batch)} jobs")
        except Exception as error:
            for entry in batch:
                if not entry.answer.done():
                    entry.answer.set_exception(error)
        else:
            for entry, outcome in zip(batch, outcomes):
                if not entry.answer.done():
                    entry.answer.set_result(outcome)
        finally:
            for entry in batch:  # only if the batch itself was cancelled (the replica is stopping)
                if not entry.answer.done():
                    entry.answer.cancel()
            self.running = 0
            self.free_since = time.monotonic()
