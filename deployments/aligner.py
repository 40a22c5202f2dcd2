"""Aligner deployment: GPU-placed (or CPU here) replicas that batch concurrent requests.

Continuous batching (deployments.batching): a job that reaches an idle replica starts at once;
jobs that arrive while a batch runs form the next one, up to `max_batch_size` jobs and
`max_batch_audio_seconds` of audio (live knobs, `user_config`). Requests' jobs go before job
windows (background), which never delay a request by more than the one batch running. Where the
backend runs on CPU (PocketSphinx), job windows have a lane of their own: a second batcher and a
second backend in a child process at a lower CPU priority (deployments.backends.child_process), so a
request's batch runs beside a window instead of after it. Serve
never gives a replica more than `max_ongoing_requests` at once, so that must be >= `max_batch_size`
(the config lint checks it).

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
import dataclasses
import functools
import logging
import os
import time
from collections import Counter

import numpy as np
from ray import serve

from deployments.backends import load_backend
from deployments.backends.base import SAMPLE_RATE, AlignerBackend, AlignmentJob, BackendFailed, BackendInfo, JobOutcome, SharedPcm
from deployments.backends.child_process import ChildProcessBackend
from deployments.batching import BatchLimits, ContinuousBatcher
from deployments.probe_access_log import quiet_probe_access_logs
from serve_app import metrics
from serve_app.media.decode import float_samples
from serve_app.settings import AlignerOptions, GraphArgs

logger = logging.getLogger("ray.serve")

_PROBE_AUDIO_SECONDS = 1.0


def audio_seconds(job: AlignmentJob) -> float:
    return job.audio.size / SAMPLE_RATE


def batch_limits(options: AlignerOptions) -> BatchLimits:
    """The batcher's limits from the aligner's live options (bench/passthrough.py batches the same way)."""
    return BatchLimits(options.max_batch_size, options.max_batch_audio_seconds, options.max_background_batch_size)


def window_lane(args: GraphArgs, backend: AlignerBackend) -> AlignerBackend | None:
    """The backend for job windows, apart from requests' (None: one lane for both)."""
    if not args.windows_in_child_process or backend.info.name != "pocketsphinx":
        return None  # Qwen3: a second model would double the GPU memory, and its batches are short
    return ChildProcessBackend(functools.partial(load_backend, args), backend.info)


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
    def __init__(self, args: GraphArgs, backend: AlignerBackend | None = None, window_backend: AlignerBackend | None = None) -> None:
        """`backend`: an already built one (tests and bench/); otherwise the one `args` names.
        `window_backend`: the job windows' (tests); otherwise `window_lane(args, backend)`."""
        metrics.label_with_replica()
        quiet_probe_access_logs("load", "info")  # the ingress probes these every second or two
        self._backend = backend or load_backend(args)
        # The one way into each backend, which is not thread-safe (one decoder): the health probe too.
        self._batcher = ContinuousBatcher(self._run, audio_seconds, batch_limits(AlignerOptions()), self._observe_wait)
        self._window_backend = window_backend or window_lane(args, self._backend)
        self._window_batcher = None
        if self._window_backend is not None:
            self._window_batcher = ContinuousBatcher(self._run_windows, audio_seconds, batch_limits(AlignerOptions()), self._observe_wait)
        self._failure_streak = 0  # jobs in a row the backend failed on (BackendFailed)
        self._batch_sizes: Counter[int] = Counter()

    def reconfigure(self, user_config: dict) -> None:
        options = AlignerOptions.model_validate(user_config)
        self._unhealthy_after_failures = options.unhealthy_after_failures
        for batcher in (self._batcher, self._window_batcher):
            if batcher is not None:
                batcher.limits = batch_limits(options)
        self._capacity = 2 * options.max_batch_size  # one batch running, one filling

    async def info(self) -> BackendInfo:
        return self._backend.info

    async def align(self, job: AlignmentJob, background: bool = False) -> JobOutcome:
        """`background`: an asynchronous job's window, batched apart and run only when no request's job waits."""
        if isinstance(job.audio, SharedPcm):  # decoded audio the scanner shared: read it from the object store
            job = dataclasses.replace(job, audio=float_samples(await job.audio.ref[0]))
        if background and self._window_batcher is not None:
            return await self._window_batcher.submit(job, background)
        return await self._batcher.submit(job, background)

    def _observe_wait(self, seconds: float, background: bool) -> None:
        tags = {"backend": self._backend.info.name, "work": "background" if background else "request"}
        metrics.BATCH_QUEUE_SECONDS.observe(seconds, tags=tags)

    async def _run(self, jobs: list[AlignmentJob]) -> list[JobOutcome]:
        """A batch of the requests' lane (and of job windows where there is no second lane)."""
        return await self._run_on(self._backend, jobs)

    async def _run_windows(self, jobs: list[AlignmentJob]) -> list[JobOutcome]:
        return await self._run_on(self._window_backend, jobs)

    async def _run_on(self, lane: AlignerBackend, jobs: list[AlignmentJob]) -> list[JobOutcome]:
        backend = self._backend.info.name
        self._batch_sizes[len(jobs)] += 1
        metrics.BATCH_SIZE.observe(len(jobs), tags={"backend": backend})
        started = time.perf_counter()
        outcomes = await self._call_backend(lane, jobs)
        metrics.INFERENCE_SECONDS.observe(time.perf_counter() - started, tags={"backend": backend})
        for outcome in outcomes:
            if isinstance(outcome, BackendFailed):
                self._failure_streak += 1
                metrics.BACKEND_FAILURES.inc(tags={"backend": backend, "error": outcome.error_type})
            else:
                self._failure_streak = 0
        return outcomes

    async def _call_backend(self, lane: AlignerBackend, jobs: list[AlignmentJob]) -> list[JobOutcome]:
        try:
            # Inference blocks (CPU or GPU): keep the replica's event loop free for arrivals.
            outcomes = await asyncio.to_thread(lane.align_batch, jobs)
        except Exception as error:  # a backend broke its per-job contract: fail the batch's jobs, not the replica
            logger.error("%s backend raised for a batch of %d: %s", self._backend.info.name, len(jobs), type(error).__name__)
            return [BackendFailed.from_error(error)] * len(jobs)
        if len(outcomes) != len(jobs):
            logger.error("%s backend answered %d outcomes for %d jobs", self._backend.info.name, len(outcomes), len(jobs))
            return [BackendFailed("WrongOutcomeCount", transient=False)] * len(jobs)
        return outcomes

    async def check_health(self) -> None:
        """Serve's health check. Free while the backend works; a probe inference after a failure streak."""
        if self._failure_streak < self._unhealthy_after_failures or self._batcher.busy:
            return  # a running batch will update the streak itself; never queue the check behind it
        streak = self._failure_streak
        outcome = await self._batcher.submit(self._probe_job())
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
            "aligner_ongoing": self._batcher.running,
            "aligner_queued": self._batcher.queued(),
            "aligner_capacity": self._capacity,
            # A job behind a running batch counts against the capacity, not as a batch wait: one
            # long file in progress would otherwise read as overload and shed everyone arriving.
            "batch_wait_s": self._batcher.idle_wait_s(),
        }

    async def pid(self) -> int:
        """This replica's process id (the refund test kills it mid-alignment)."""
        return os.getpid()

    async def batch_sizes(self) -> dict[int, int]:
        """How many batches of each size this replica has run (for tests and bench/)."""
        return dict(self._batch_sizes)
