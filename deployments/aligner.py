"""Aligner deployment: GPU-placed (or CPU here) replicas that batch concurrent requests.

`@serve.batch` gathers up to `max_batch_size` concurrent `align()` calls (waiting at most
`batch_wait_timeout_s`) and hands them to the backend as one batch; both knobs are live
(`user_config`). Serve never gives a replica more than `max_ongoing_requests` at once, so that must
be >= `max_batch_size` (the config lint checks it).

Failure policy: a job the backend cannot align comes back as an `AlignmentFailed` value for that
request alone. A backend crash raises into the ingress (503); a replica that dies is restarted by
Serve, and `max_queued_requests` bounds the queue in front of it (503 beyond it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from ray import serve

from deployments.backends import load_backend
from deployments.backends.base import AlignmentFailed, AlignmentJob, BackendInfo, UnitTiming
from serve_app import metrics
from serve_app.settings import AlignerOptions, GraphArgs

logger = logging.getLogger("ray.serve")



@serve.deployment(
    name="Aligner",
    ray_actor_options={"num_cpus": 0.5, "num_gpus": 0},
    max_ongoing_requests=16,
    max_queued_requests=64,
    autoscaling_config={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8},
    user_config=AlignerOptions().model_dump(),
)
class Aligner:
    def __init__(self, args: GraphArgs) -> None:
        metrics.label_with_replica()
        self._backend = load_backend(args)
        self._batch_sizes: Counter[int] = Counter()
        self._waiting_since: dict[object, float] = {}  # jobs waiting for a batch -> when they arrived
        self._running = 0  # jobs in the batch being aligned
        self._free_since = time.monotonic()  # when the last batch ended: jobs wait for a batch from then

    def reconfigure(self, user_config: dict) -> None:
        options = AlignerOptions.model_validate(user_config)
        self._align_batch.set_max_batch_size(options.max_batch_size)
        self._align_batch.set_batch_wait_timeout_s(options.batch_wait_timeout_s)
        self._capacity = 2 * options.max_batch_size  # one batch running, one filling

    async def info(self) -> BackendInfo:
        return self._backend.info

    async def align(self, job: AlignmentJob) -> list[UnitTiming] | AlignmentFailed:
        ticket = object()
        self._waiting_since[ticket] = time.monotonic()
        try:
            return await self._align_batch((job, ticket))
        finally:
            self._waiting_since.pop(ticket, None)  # normally gone already, when its batch started

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _align_batch(self, entries: list[tuple[AlignmentJob, object]]) -> list[list[UnitTiming] | AlignmentFailed]:
        for _, ticket in entries:
            self._waiting_since.pop(ticket, None)
        jobs = [job for job, _ in entries]
        self._running = len(jobs)
        try:
            return await self._run(jobs)
        finally:
            self._running = 0
            self._free_since = time.monotonic()

    async def _run(self, jobs: list[AlignmentJob]) -> list[list[UnitTiming] | AlignmentFailed]:
        backend = self._backend.info.name
        self._batch_sizes[len(jobs)] += 1
        metrics.BATCH_SIZE.observe(len(jobs), tags={"backend": backend})
        started = time.perf_counter()
        # Inference blocks (CPU or GPU): keep the replica's event loop free to accept the next batch.
        outcomes = await asyncio.to_thread(self._backend.align_batch, jobs)
        metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started, tags={"backend": backend})
        return outcomes

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

    async def batch_sizes(self) -> dict[int, int]:
        """How many batches of each size this replica has run (for tests and bench/)."""
        return dict(self._batch_sizes)
