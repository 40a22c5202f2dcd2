"""Aligner deployment: GPU-placed (or CPU here) replicas that batch concurrent requests.

`@serve.batch` gathers up to `max_batch_size` concurrent `align()` calls (waiting at most
`batch_wait_timeout_s`) and hands them to the backend as one batch; both knobs are live
(`user_config`). Serve never gives a replica more than `max_ongoing_requests` at once, so that must
be >= `max_batch_size` (the config lint checks it).

Failure policy: every job gets its own outcome. A job the backend cannot align comes back as
`AlignmentFailed` (a 422 at the ingress); a job the backend failed on as `BackendFailed` (503 or
500), and if `align_batch` itself raises, each job of that batch gets a `BackendFailed`: the
replica keeps serving. `check_health` (called by Serve every `health_check_period_s`) stays cheap:
only after `unhealthy_after_failures` jobs in a row failed in the backend does it run one probe
inference on a tiny known-good job; if that fails too it raises and Serve replaces the replica.
The probe is what stops a client who sends inputs that crash the backend from getting a healthy
replica replaced. A replica that dies is restarted by Serve, and `max_queued_requests` bounds the
queue in front of it (503 beyond it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
from ray import serve

from deployments.backends import load_backend
from deployments.backends.base import SAMPLE_RATE, AlignerBackend, AlignmentJob, BackendFailed, BackendInfo, JobOutcome
from deployments.probe_access_log import quiet_probe_access_logs
from serve_app import metrics
from serve_app.settings import AlignerOptions, GraphArgs

logger = logging.getLogger("ray.serve")

_PROBE_AUDIO_SECONDS = 1.0


class BackendTurns:
    """One batch at a time in the backend; a waiting request batch always goes before a background one.

    Background work (job windows) thus delays a POST /v1/align batch by at most the one background
    batch already running, never by a queue of them.
    """

    def __init__(self) -> None:
        self._condition = asyncio.Condition()
        self.busy = False
        self._foreground_waiting = 0

    @asynccontextmanager
    async def hold(self, background: bool) -> AsyncIterator[None]:
        async with self._condition:
            self._foreground_waiting += 0 if background else 1
            try:
                await self._condition.wait_for(lambda: not self.busy and (not background or self._foreground_waiting == 0))
            finally:
                self._foreground_waiting -= 0 if background else 1
            self.busy = True
        try:
            yield
        finally:
            async with self._condition:
                self.busy = False
                self._condition.notify_all()


class BackendUnhealthy(RuntimeError):
    """Raised by check_health: Serve replaces the replica after its health_check failure threshold."""


@serve.deployment(
    name="Aligner",
    ray_actor_options={"num_cpus": 0.5, "num_gpus": 0},
    max_ongoing_requests=16,
    max_queued_requests=64,
    autoscaling_config={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8},
    user_config=AlignerOptions().model_dump(),
)
class Aligner:
    def __init__(self, args: GraphArgs, backend: AlignerBackend | None = None) -> None:
        """`backend`: an already built one (tests and bench/); otherwise the one `args` names."""
        metrics.label_with_replica()
        quiet_probe_access_logs("load", "info")  # the ingress probes these every second or two
        self._backend = backend or load_backend(args)
        # Backends are not thread-safe (one decoder): batches and the health probe take turns.
        self._backend_turns = BackendTurns()
        self._failure_streak = 0  # jobs in a row the backend failed on (BackendFailed)
        self._batch_sizes: Counter[int] = Counter()
        self._waiting_since: dict[object, float] = {}  # jobs waiting for a batch -> when they arrived
        self._running = 0  # jobs in the batch being aligned
        self._free_since = time.monotonic()  # when the last batch ended: jobs wait for a batch from then

    def reconfigure(self, user_config: dict) -> None:
        options = AlignerOptions.model_validate(user_config)
        self._unhealthy_after_failures = options.unhealthy_after_failures
        self._align_batch.set_max_batch_size(options.max_batch_size)
        self._align_background_batch.set_max_batch_size(options.max_background_batch_size)
        for batch in (self._align_batch, self._align_background_batch):
            batch.set_batch_wait_timeout_s(options.batch_wait_timeout_s)
        self._capacity = 2 * options.max_batch_size  # one batch running, one filling

    async def info(self) -> BackendInfo:
        return self._backend.info

    async def align(self, job: AlignmentJob, background: bool = False) -> JobOutcome:
        """`background`: an asynchronous job's window, batched apart and run only when no request's batch waits."""
        ticket = object()
        self._waiting_since[ticket] = time.monotonic()
        try:
            batch = self._align_background_batch if background else self._align_batch
            return await batch((job, ticket))
        finally:
            self._waiting_since.pop(ticket, None)  # normally gone already, when its batch started

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _align_batch(self, entries: list[tuple[AlignmentJob, object]]) -> list[JobOutcome]:
        return await self._run_batch(entries, background=False)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _align_background_batch(self, entries: list[tuple[AlignmentJob, object]]) -> list[JobOutcome]:
        return await self._run_batch(entries, background=True)

    async def _run_batch(self, entries: list[tuple[AlignmentJob, object]], *, background: bool) -> list[JobOutcome]:
        for _, ticket in entries:
            self._waiting_since.pop(ticket, None)
        jobs = [job for job, _ in entries]
        self._running += len(jobs)
        try:
            return await self._run(jobs, background)
        finally:
            self._running -= len(jobs)
            self._free_since = time.monotonic()

    async def _run(self, jobs: list[AlignmentJob], background: bool = False) -> list[JobOutcome]:
        backend = self._backend.info.name
        self._batch_sizes[len(jobs)] += 1
        metrics.BATCH_SIZE.observe(len(jobs), tags={"backend": backend})
        started = time.perf_counter()
        outcomes = await self._call_backend(jobs, background)
        metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started, tags={"backend": backend})
        for outcome in outcomes:
            if isinstance(outcome, BackendFailed):
                self._failure_streak += 1
                metrics.BACKEND_FAILURES.inc(tags={"backend": backend, "error": outcome.error_type})
            else:
                self._failure_streak = 0
        return outcomes

    async def _call_backend(self, jobs: list[AlignmentJob], background: bool = False) -> list[JobOutcome]:
        async with self._backend_turns.hold(background):
            try:
                # Inference blocks (CPU or GPU): keep the replica's event loop free for the next batch.
                outcomes = await asyncio.to_thread(self._backend.align_batch, jobs)
            except Exception as error:  # a backend broke its per-job contract: fail the batch's jobs, not the replica
                logger.error("%s backend raised for a batch of %d: %s", self._backend.info.name, len(jobs), type(error).__name__)
                return [BackendFailed.from_error(error)] * len(jobs)
        if len(outcomes) != len(jobs):
            logger.error("%s backend answered %d outcomes for %d jobs", self._backend.info.name, len(outcomes), len(jobs))
            return [BackendFailed("WrongOutcomeCount", transient=False)] * len(jobs)
        return outcomes

    async def check_health(self) -> None:
        """Serve's health check. Free while the backend works; a probe inference after a failure streak."""
        if self._failure_streak < self._unhealthy_after_failures or self._backend_turns.busy:
            return  # a running batch will update the streak itself; never queue the check behind it
        streak = self._failure_streak
        (outcome,) = await self._call_backend([self._probe_job()])
        if isinstance(outcome, BackendFailed):
            raise BackendUnhealthy(f"{streak} jobs in a row failed and a probe inference failed too ({outcome.error_type})")
        logger.warning("%d jobs in a row failed in the backend, but its probe inference works: keeping the replica", streak)
        self._failure_streak = 0

    def _probe_job(self) -> AlignmentJob:
        # Quiet noise and one word: "cannot be aligned" is a fine answer, only an exception is not.
        noise = np.random.default_rng(0).standard_normal(round(_PROBE_AUDIO_SECONDS * SAMPLE_RATE)) * 0.01
        languages = self._backend.info.languages
        return AlignmentJob(noise.astype(np.float32), ("hello",), "English" if "English" in languages else min(languages))

    async def load(self) -> dict[str, float]:
        """This replica's load, sampled by the ingress's shedder (serve_app.security.shedding.LoadSample)."""
        return {
            "aligner_ongoing": self._running,
            "aligner_queued": len(self._waiting_since),
            "aligner_capacity": self._capacity,
            "batch_wait_s": self._batch_wait_s(),
        }

    def _batch_wait_s(self) -> float:
        """How long the oldest waiting job has waited for a batch while none was running.

        A job behind a running batch is counted in `aligner_queued` against the capacity, not as a
        batch wait: one long file in progress would otherwise read as overload and shed everyone
        who arrives meanwhile. Always the current wait, never a stale figure from a busy spell (an
        idle aligner reports 0).
        """
        if self._running or not self._waiting_since:
            return 0.0
        now = time.monotonic()
        return now - max(min(self._waiting_since.values()), self._free_since)

    async def pid(self) -> int:
        """This replica's process id (the refund test kills it mid-alignment)."""
        return os.getpid()

    async def batch_sizes(self) -> dict[int, int]:
        """How many batches of each size this replica has run (for tests and bench/)."""
        return dict(self._batch_sizes)
