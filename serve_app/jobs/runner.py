"""The job runner: takes jobs from the Redis stream, aligns them, and ends each in one terminal state.

Why Redis Streams and not Ray Serve's asynchronous inference (ray.serve.task_consumer, alpha in
Ray 2.60): its Redis adapter there (TaskiqTaskProcessorAdapter) is a stub whose every method raises
NotImplementedError, and the Celery adapter adds Celery and Kombu, whose Redis transport redelivers
only after a visibility timeout and keeps its own task state apart from ours. A consumer group gives
what jobs need with the Redis we already run: entries survive restarts (append-only), a pending
entry stays with its consumer until acknowledged, and XAUTOCLAIM hands the entry of a consumer that
stopped renewing its claim (a runner that died) to another one. The work itself runs on Ray: each
window is an ordinary call to the Aligner deployment, whose batching stays the one place models run.

One job, read top to bottom (`_run_entry`):
  1. start an attempt (queued or redelivered running -> running, attempt + 1: serve_app.jobs.store);
     a job already ended or deleted is acknowledged and dropped; one past `max_attempts` deliveries,
     or past its run deadline, is failed; one whose owner already has `max_running_per_owner` jobs
     running is queued again at the back, so one principal's folder of long files never holds
     every runner while another's short job waits;
  2. align the job's decoded audio (the spool's jobs/ directory) in windows, writing progress at
     most every `progress_interval_s`, while a heartbeat renews the stream claim every lease/3 and
     watches for a cancellation (which stops the work at once);
  3. end it: succeeded with its words, or failed with the problem; remove its audio; acknowledge.

Failure policy:
- a window the aligner failed on our side (503: replica died or saturated, a transient backend
  failure) is retried with backoff, `window_retries` times, counted in aligner_job_window_retries;
  the window is counted once in the progress, whatever its retries;
- this runner dying mid-job: the entry is redelivered after `lease_s` and the job starts over in a
  new attempt. Writes are fenced by the attempt number, so a stale runner's progress and result are
  dropped, and a job ends exactly once;
- Redis down: no new job is taken (the loop backs off); a running job goes on, its progress writes
  are skipped, and its terminal state is retried until Redis answers (jobs state must not be lost);
- a failure on our side (5xx, deadline, attempts exhausted) refunds the audio seconds charged at
  submission; a failure of the input (4xx: the transcript does not match the audio) keeps them;
- audio a crash left in the job spool (no queued or running job holds it) is deleted by
  sweep_orphans once idle `orphan_age_s`; without Redis it is kept;
- nothing raised here ends the loop: an unexpected error in one job fails that job (500, logged by
  type, never a traceback in the job document);
- a cancelled runner (its replica stopping) stops: the store's client never returns from a command
  on a cancelled task, which redis-py alone can (redis_store.stop_if_cancelled).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np

from deployments.backends.base import SAMPLE_RATE, AlignmentJob, BackendFailed, BackendInfo, JobOutcome
from serve_app import metrics
from serve_app.jobs.store import Deferred, Ended, Finished, JobRecord, JobStore, Started
from serve_app.media import DecodedAudio
from serve_app.media.spool import Spool
from serve_app.pipeline.alignment import Align, Alignment, AudioAligner, WindowProgress
from serve_app.problems import Problem, problem_body
from serve_app.security.audit import AuditContext, AuditLog
from serve_app.security.redis_store import STORE_ERRORS
from serve_app.settings import JobRunnerOptions
from serve_app.text.transcript import TranscriptRejected, parse_transcript

logger = logging.getLogger("ray.serve")

_T = TypeVar("_T")
_MAX_BACKOFF_S = 30.0
_BLOCK_MS = 1000  # one XREADGROUP waits this long for a new entry
_DEFER_PAUSE_S = 0.5  # after queueing a job again: a queue of one owner's jobs is not read in a tight loop


Refund = Callable[[JobRecord], Awaitable[bool]]
"""Give a job's charged audio seconds back to its owner; False when the store failed."""


async def patiently(call: Callable[[], Awaitable[_T]], options: JobRunnerOptions, transient: Callable[[_T], bool] = lambda _: False) -> _T:
    """`call()`, retried with backoff while it fails on our side: a 503 problem (the deployment
    died, is saturated or slow) or an answer `transient` says a retry may fix; at most
    `window_retries` times, then its last answer (or problem) stands."""
    backoff, retries = options.retry_backoff_s, 0
    while True:
        try:
            answer = await call()
            if not transient(answer) or retries == options.window_retries:
                return answer
        except Problem as problem:
            if problem.type.status != 503 or retries == options.window_retries:
                raise
        retries += 1
        metrics.JOB_WINDOW_RETRIES.inc()
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, _MAX_BACKOFF_S)


def retrying_align(align: Align, options: JobRunnerOptions) -> Align:
    """`align` with a job's patience (a transient backend failure, out of memory, is retried too)."""

    async def align_retried(job: AlignmentJob) -> JobOutcome:
        return await patiently(lambda: align(job), options, lambda outcome: isinstance(outcome, BackendFailed) and outcome.transient)

    return align_retried


def result_document(alignment: Alignment, backend: BackendInfo) -> dict:
    """What a succeeded job stores: the words, rendered into any format when fetched."""
    return {
        "duration": alignment.duration,
        "backend": backend.name,
        "model": backend.model,
        "words": [[word.text, word.start, word.end, word.confidence, list(word.flags)] for word in alignment.words],
    }


def envelope_of(record: JobRecord) -> np.ndarray:
    return np.fromfile(record.envelope_path, dtype="<f4")


def estimated_windows(progress: WindowProgress) -> int:
    """Window jobs the whole file will take, extrapolated from how far the walk has got."""
    if progress.audio_seconds <= 0:
        return progress.windows
    return max(progress.windows, math.ceil(progress.windows * progress.total_seconds / progress.audio_seconds))


class _Stopped(Exception):
    """The job's record is gone (deleted) before its work began."""


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        aligner: Callable[[], Awaitable[AudioAligner]],
        refund: Refund,
        spool: Spool,
        audit: AuditLog,
        consumer: str,
        options: JobRunnerOptions,
    ) -> None:
        """`aligner`: the AudioAligner to use now (its backend info is fetched once the aligner is up)."""
        self._store = store
        self._aligner = aligner
        self._refund = refund
        self._spool = spool
        self._audit = audit
        self._consumer = consumer
        self.options = options
        self._slots = asyncio.Semaphore(options.max_running_jobs)
        self._running: set[asyncio.Task] = set()

    @property
    def running(self) -> int:
        return len(self._running)

    async def run(self) -> None:
        """Take jobs forever, at most `max_running_jobs` at once."""
        await self._retrying(self._store.ensure_group, "creating the consumer group")
        try:
            while True:
                await self._slots.acquire()
                entry = await self._retrying(self._next_entry, "reading the job stream")
                task = asyncio.create_task(self._run_entry(*entry))
                self._running.add(task)
                task.add_done_callback(self._finished)
        finally:  # stopped (the replica shuts down): its jobs stay pending in the stream, for redelivery
            for task in list(self._running):
                task.cancel()

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            logger.error("job runner: a job's task raised %s", type(task.exception()).__name__)

    async def _next_entry(self) -> tuple[str, str]:
        while True:
            entry = await self._store.claim_abandoned(self._consumer, int(self.options.lease_s * 1000))
            if entry is None:
                entry = await self._store.next_entry(self._consumer, _BLOCK_MS)
            if entry is not None:
                return entry

    async def sweep_expired(self) -> None:
        """Forever: delete ended jobs past their retention, one audit line each."""

        async def expire_ended() -> None:
            for job_id in await self._store.expired(time.time()):
                owner = await self._store.expire(job_id)
                if owner is not None:
                    metrics.JOBS.inc(tags={"event": "expired"})
                    self._audit.record(AuditContext("-", "-", "job-runner", None), "job", "expired", "retention", job_id=job_id)

        await self._every(lambda: self.options.expiry_sweep_s, "job expiry sweep", expire_ended)

    async def sweep_orphans(self) -> None:
        """Forever: delete job spool files no queued or running job holds, once idle `orphan_age_s`.

        They are what a crash leaves: an ingress between moving a job's audio in and submitting it,
        a runner between ending a job and removing its audio. Without Redis nothing is deleted (it
        cannot be told which files are still held); the age covers a job being submitted meanwhile.
        """

        async def delete_orphans() -> None:
            held = await self._store.queued_audio()
            removed = await asyncio.to_thread(self._spool.sweep, self.options.orphan_age_s, held)
            if removed:
                logger.warning("job spool sweep: %d orphaned file(s) deleted", removed)

        await self._every(lambda: self.options.orphan_sweep_s, "job spool sweep", delete_orphans)

    @staticmethod
    async def _every(interval_s: Callable[[], float], what: str, step: Callable[[], Awaitable[None]]) -> None:
        """`step()` forever, `interval_s()` apart; a Redis failure is logged and waits for the next turn."""
        while True:
            try:
                await step()
            except STORE_ERRORS as error:
                logger.warning("%s: Redis failed (%s); retrying later", what, type(error).__name__)
            await asyncio.sleep(interval_s())

    # -- one job ---------------------------------------------------------------------------------

    async def _run_entry(self, entry_id: str, job_id: str) -> None:
        now = time.time()
        started = await self._retrying(
            lambda: self._store.start(job_id, self._consumer, now, self.options.max_attempts, self.options.max_running_per_owner), "starting a job"
        )
        if isinstance(started, Deferred):  # its owner runs its share already: others' jobs go first
            await self._retrying(lambda: self._store.requeue(entry_id, job_id), "queueing a job again")
            await asyncio.sleep(_DEFER_PAUSE_S)
            return
        if isinstance(started, Ended):
            await self._retrying(lambda: self._store.acknowledge(entry_id), "acknowledging a job")
            return
        if not isinstance(started, Started):  # the attempt number past max_attempts
            record = await self._retrying(lambda: self._store.get(job_id, now), "reading a job")
            if record is not None:
                problem = Problem("internal-error", f"the job was interrupted {started - 1} times; it is failed and its audio seconds refunded")
                await self._end(record, started, problem=problem)
            await self._retrying(lambda: self._store.acknowledge(entry_id), "acknowledging a job")
            return
        record, attempt = started.record, started.attempt
        metrics.JOBS.inc(tags={"event": "started" if attempt == 1 else "redelivered"})
        if attempt == 1:
            metrics.JOB_QUEUE_SECONDS.observe(max(now - record.created_at, 0.0))
        deadline = (record.started_at or now) + self.options.run_deadline_s + record.duration * self.options.run_deadline_per_audio_s
        stopped: list[str] = []  # the status the heartbeat found instead of "running"
        work = asyncio.create_task(self._work(record, attempt))
        heartbeat = asyncio.create_task(self._heartbeat(entry_id, job_id, attempt, work, stopped))
        try:
            done, _ = await asyncio.wait({work}, timeout=max(deadline - now, 0.0))
        finally:  # this task cancelled (the replica stops): the entry stays pending, for redelivery
            heartbeat.cancel()
            if not work.done():
                work.cancel()
        if stopped or (done and not work.cancelled() and isinstance(work.exception(), _Stopped)):
            if stopped and stopped[0] == "running":
                return  # redelivered to another runner: that attempt owns the job and its audio now
            self._spool_cleanup(record)  # cancelled or deleted: whoever did it counted and audited it
        elif not done:
            await self._end(record, attempt, problem=Problem("internal-error", "the job did not finish before its deadline; it is failed and its audio seconds refunded"))
        elif isinstance(work.exception(), Problem):
            await self._end(record, attempt, problem=work.exception())
        elif work.exception() is not None:  # never a traceback in the job document
            logger.error("job runner: a job failed with %s", type(work.exception()).__name__)
            await self._end(record, attempt, problem=Problem("internal-error", "the job failed on our side; its audio seconds are refunded"))
        else:
            await self._end(record, attempt, result=work.result())
        await self._retrying(lambda: self._store.acknowledge(entry_id), "acknowledging a job")

    async def _work(self, record: JobRecord, attempt: int) -> dict:
        text = await self._retrying(lambda: self._store.transcript(record.id), "reading a transcript")
        if text is None:
            raise _Stopped()
        try:  # checked at submission; parsed again here with the same rules, so the same units
            transcript = parse_transcript(text, record.language, max_chars=len(text) + 1, max_units=len(text) + 1)
        except TranscriptRejected as rejected:
            raise Problem(rejected.reason, rejected.detail) from None
        audio = DecodedAudio(
            pcm_path=record.pcm_path,
            sample_count=round(record.duration * SAMPLE_RATE),
            envelope=envelope_of(record),
            container="", codec="", source_sample_rate=SAMPLE_RATE, source_channels=1,
        )  # fmt: skip
        written_at = 0.0

        async def progress(done: WindowProgress) -> None:
            nonlocal written_at
            final = done.audio_seconds >= done.total_seconds
            if not final and time.monotonic() - written_at < self.options.progress_interval_s:
                return
            written_at = time.monotonic()
            try:
                await self._store.progress(
                    record.id, attempt, windows_done=done.windows, windows_total=estimated_windows(done), audio_seconds_done=round(done.audio_seconds, 3)
                )
            except STORE_ERRORS:  # progress is best effort; the result is not
                pass

        aligner = await self._aligner()
        return result_document(await aligner.align(audio, transcript, progress), aligner.backend)

    async def _heartbeat(self, entry_id: str, job_id: str, attempt: int, work: asyncio.Task, stopped: list[str]) -> None:
        """Renew the claim on the entry; stop the work when the job is no longer this attempt's to run."""
        while not work.done():
            await asyncio.sleep(self.options.lease_s / 3)
            try:
                await self._store.keep_claimed(self._consumer, entry_id)
                status, current = await self._store.status(job_id)
            except STORE_ERRORS:
                continue  # Redis away: the work goes on; the attempt fence settles any redelivery
            if status != "running" or current != attempt:
                stopped.append(status or "gone")
                work.cancel()
                return

    async def _end(self, record: JobRecord, attempt: int, *, result: dict | None = None, problem: Problem | None = None) -> None:
        status = "succeeded" if result is not None else "failed"
        error = None if problem is None else problem_body(problem, None)
        ended = await self._retrying(
            lambda: self._store.finish(
                record.id, status, attempt=attempt, now=time.time(), owner=record.owner,
                result=result, error=error,
            ),
            "ending a job",
        )  # fmt: skip
        if isinstance(ended, Ended) and ended.status == "running":
            return  # a newer attempt (redelivery) owns the job and its audio now
        self._spool_cleanup(record)
        if not isinstance(ended, Finished):
            return  # cancelled or deleted meanwhile: that path counted and audited it
        metrics.JOBS.inc(tags={"event": status})
        metrics.JOB_RESULT_SECONDS.observe(max(time.time() - record.created_at, 0.0), tags={"status": status})
        refunded = problem is not None and problem.type.status >= 500 and await self._refund(record)
        self._audit.record(
            AuditContext("-", "-", "job-runner", record.principal_id), "job", status, problem.type.slug if problem else "aligned",
            job_id=record.id, decoded_seconds=round(record.duration, 3), refunded=refunded,
        )  # fmt: skip

    def _spool_cleanup(self, record: JobRecord) -> None:
        self._spool.remove(record.pcm_path)
        self._spool.remove(record.envelope_path)

    async def _retrying(self, call: Callable[[], Awaitable], what: str):
        """`call()` until Redis answers: job state is never given up on (backoff doubling to 30 s)."""
        backoff = self.options.retry_backoff_s
        while True:
            try:
                return await call()
            except STORE_ERRORS as error:
                logger.warning("job runner: Redis failed while %s (%s); retrying in %.0f s", what, type(error).__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
