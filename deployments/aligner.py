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
        self._backend = load_backend(args)
        self._batch_sizes: Counter[int] = Counter()

    def reconfigure(self, user_config: dict) -> None:
        options = AlignerOptions.model_validate(user_config)
        self._align_batch.set_max_batch_size(options.max_batch_size)
        self._align_batch.set_batch_wait_timeout_s(options.batch_wait_timeout_s)

    async def info(self) -> BackendInfo:
        return self._backend.info

    async def align(self, job: AlignmentJob) -> list[UnitTiming] | AlignmentFailed:
        return await self._align_batch(job)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _align_batch(self, jobs: list[AlignmentJob]) -> list[list[UnitTiming] | AlignmentFailed]:
        backend = self._backend.info.name
        self._batch_sizes[len(jobs)] += 1
        metrics.BATCH_SIZE.observe(len(jobs), tags={"backend": backend})
        started = time.perf_counter()
        # Inference blocks (CPU or GPU): keep the replica's event loop free to accept the next batch.
        outcomes = await asyncio.to_thread(self._backend.align_batch, jobs)
        metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started, tags={"backend": backend})
        return outcomes

    async def batch_sizes(self) -> dict[int, int]:
        """How many batches of each size this replica has run (for tests and bench/)."""
        return dict(self._batch_sizes)
