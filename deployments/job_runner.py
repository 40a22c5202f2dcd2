"""JobRunner deployment: CPU replicas that run asynchronous alignment jobs (serve_app.jobs.runner).

Each replica is one consumer of the Redis job stream, named after its Serve replica, and runs at
most `max_running_jobs` jobs, each window an ordinary call to the Aligner deployment (marked as
background work, so POST /v1/align batches go first: deployments.aligner). No HTTP here: the job
API is the Ingress's; this deployment only works.

Failure policy: see serve_app.jobs.runner. A replica that dies leaves its jobs pending in the
stream: another replica (or its replacement) claims them after `lease_s` and starts them over.
`check_health` fails when the runner's loop has stopped, so Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import logging
import os

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.backends.base import AlignmentJob, BackendInfo, JobOutcome
from deployments.downstream import downstream
from deployments.probe_access_log import quiet_probe_access_logs
from serve_app import metrics
from serve_app.jobs.runner import JobRunner as Runner
from serve_app.jobs.runner import patiently, retrying_align
from serve_app.jobs.store import JobRecord, JobStore, namespace_of
from serve_app.media.spool import Spool
from serve_app.pipeline.alignment import AudioAligner
from serve_app.security.audit import AuditLog
from serve_app.security.ratelimit import AUDIO_SECONDS_POLICY, TokenBucketLimiter
from serve_app.security.redis_store import STORE_ERRORS, redis_client
from serve_app.settings import Environment, JobRunnerOptions

logger = logging.getLogger("ray.serve")

_REDIS_TIMEOUT_S = 5.0  # above the stream read's 1 s block; job state is not on a request path
_GAUGE_INTERVAL_S = 5.0
_BACKEND_INFO_TIMEOUT_S = 10.0


class RunnerStopped(RuntimeError):
    """Raised by check_health: the job loop is no longer running."""


@serve.deployment(
    name="JobRunner",
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=8,
    max_queued_requests=16,
    autoscaling_config={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 4},
    user_config=JobRunnerOptions().model_dump(),
)
class JobRunner:
    def __init__(self, aligner: DeploymentHandle) -> None:
        metrics.label_with_replica()
        quiet_probe_access_logs("status")  # the ingress's dependency probe calls it every few seconds
        self._aligner_handle = aligner
        environment = Environment.from_env()
        self._redis = redis_client(environment.redis_url.get_secret_value(), environment.redis_sentinel, timeout_s=_REDIS_TIMEOUT_S)
        self._store = JobStore(self._redis, namespace_of(serve.get_replica_context().app_name))
        self._limiter = TokenBucketLimiter(self._redis)
        self._spool = Spool(environment.job_spool_dir)
        self._audit = AuditLog.from_destination(environment.audit_log)
        self._consumer = serve.get_replica_context().replica_tag
        self._backend: BackendInfo | None = None
        self._runner: Runner | None = None
        self._tasks: list[asyncio.Task] = []

    async def reconfigure(self, user_config: dict) -> None:
        options = JobRunnerOptions.model_validate(user_config)
        if self._runner is None:
            self._runner = Runner(self._store, self._audio_aligner, self._refund, self._spool, self._audit, self._consumer, options)
            self._tasks = [
                asyncio.create_task(self._runner.run()),
                asyncio.create_task(self._runner.sweep_expired()),
                asyncio.create_task(self._runner.sweep_orphans()),
                asyncio.create_task(self._export_gauges()),
            ]
        else:
            self._runner.options = options  # max_running_jobs applies from the next start

    async def __del__(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def check_health(self) -> None:
        for task in self._tasks:
            if task.done():
                raise RunnerStopped("a job runner loop has stopped")

    async def status(self) -> dict[str, int | str]:
        """For /v1/ready's jobs report: this consumer, how many jobs it runs now, its job spool's mark."""
        assert self._runner is not None
        return {"consumer": self._consumer, "running": self._runner.running, "spool_volume": self._spool.volume}

    async def pid(self) -> int:
        """This replica's process id (the redelivery test kills it mid-job)."""
        return os.getpid()

    async def _audio_aligner(self) -> AudioAligner:
        options = self._runner.options
        if self._backend is None:
            self._backend = await patiently(
                lambda: downstream(self._aligner_handle.info.remote(), "aligner", _BACKEND_INFO_TIMEOUT_S, options.retry_after_s), options
            )

        async def align(job: AlignmentJob) -> JobOutcome:
            return await downstream(self._aligner_handle.align.remote(job, True), "aligner", options.align_timeout_s, options.retry_after_s)

        return AudioAligner(retrying_align(align, options), self._backend, options.retry_after_s, refine_concurrency=options.refine_concurrency)

    async def _refund(self, record: JobRecord) -> bool:
        capacity, refill_per_s = record.audio_bucket
        try:
            await self._limiter.take(record.owner, capacity, refill_per_s, -record.duration, policy=AUDIO_SECONDS_POLICY)
        except STORE_ERRORS as error:
            logger.error("job runner: refund failed, Redis: %s", type(error).__name__)
            return False
        return True

    async def _export_gauges(self) -> None:
        # Re-set periodically: a Ray gauge disappears from the export ~30 s after its last set().
        while True:
            try:
                counts = await self._store.state_counts()
                for state, count in counts.items():
                    metrics.JOBS_BY_STATE.set(count, tags={"state": state})
                metrics.JOB_QUEUE_DEPTH.set(await self._store.queue_depth())
            except STORE_ERRORS:
                pass  # the gauges go stale and disappear: Redis down reads as no data, not as zero
            await asyncio.sleep(_GAUGE_INTERVAL_S)
