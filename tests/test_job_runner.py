"""The job store and runner against a real Redis of their own (no Serve): transitions, fencing,
redelivery, deadlines, retries, Redis outages and expiry.

The Aligner deployment is replaced by a plain function that times the units evenly over the
window it is given (it has to stand for model work somewhere; Redis, the stream and the runner's
code are the real ones). Each test has its own redis-server, so stopping it disturbs nothing else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

import numpy as np
import pytest

from deployments.backends.base import SAMPLE_RATE, AlignmentJob, BackendInfo, UnitTiming
from serve_app.jobs.runner import JobRunner, retrying_align
from serve_app.jobs.store import FOREIGN, AtCap, Created, Ended, Finished, JobStore, NewJob, new_job_id
from serve_app.media.spool import Spool
from serve_app.pipeline.alignment import AudioAligner
from serve_app.problems import unavailable
from serve_app.security.audit import LOGGER_NAME as AUDIT_LOGGER
from serve_app.security.audit import AuditLog
from serve_app.security.redis_store import redis_client
from serve_app.settings import JobRunnerOptions
from tests.support.spool import age, spool_entries

BACKEND = BackendInfo(name="even", model="even-spacing", languages=frozenset({"English"}), max_audio_seconds=30.0)
TEXT = "one two three four five six"
SECONDS = 3.0


class EvenAligner:
    """Times the units evenly over the window; `delay_s` per call; the first `failures` calls answer 503."""

    def __init__(self, delay_s: float = 0.0, failures: int = 0) -> None:
        self.delay_s, self.failures, self.calls = delay_s, failures, 0

    async def __call__(self, job: AlignmentJob) -> list[UnitTiming]:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if self.calls <= self.failures:
            raise unavailable("the aligner failed; retry later", 1)
        step = job.audio.size / SAMPLE_RATE / len(job.units)
        return [UnitTiming(unit, index * step, (index + 1) * step, 1.0) for index, unit in enumerate(job.units)]


class Harness:
    def __init__(self, redis_url: str, spool_dir, audit_path) -> None:
        self.redis = redis_client(redis_url, None, timeout_s=2.0)
        self.spool_dir = spool_dir
        spool = Spool(spool_dir)
        self.store = JobStore(self.redis, "test")
        self.spool = spool
        self.audit = AuditLog(path=str(audit_path))
        self.refunds: list[str] = []

    def spool_files(self) -> list[str]:
        return spool_entries(self.spool_dir)

    def new_job(self, owner: str = "api_key:alice", retain_s: float = 60.0, text: str = TEXT) -> NewJob:
        samples = (np.random.default_rng(0).standard_normal(round(SECONDS * SAMPLE_RATE)) * 3000).astype("<i2")
        with self.spool.writer("pcm") as writer:
            writer.write(samples)
            pcm = writer.commit()
        with self.spool.writer("envelope") as writer:
            writer.write(np.full(round(SECONDS * 100), 0.1, dtype="<f4"))
            envelope = writer.commit()
        return NewJob(
            id=new_job_id(), owner=owner, principal_id=owner.split(":")[1], created_at=time.time(), language="English",
            format="json", transcript=text, duration=SECONDS, pcm_path=pcm.path, envelope_path=envelope.path,
            audio_bucket=(3600.0, 1.0), retain_s=retain_s,
        )  # fmt: skip

    def runner(self, aligner: EvenAligner, consumer: str = "runner-a", **options) -> JobRunner:
        settings = JobRunnerOptions(**{"lease_s": 2, "retry_backoff_s": 0.05, "progress_interval_s": 0.01, "expiry_sweep_s": 0.2, **options})

        async def audio_aligner() -> AudioAligner:
            return AudioAligner(retrying_align(aligner, settings), BACKEND, 1)

        async def refund(record) -> bool:
            self.refunds.append(record.id)
            return True

        return JobRunner(self.store, audio_aligner, refund, self.spool, self.audit, consumer, settings)

    async def wait_status(self, job_id: str, statuses: set[str], timeout_s: float = 20.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            record = await self.store.get(job_id, time.time())
            if record is not None and record.status in statuses:
                return record
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{job_id} not in {statuses}")


@pytest.fixture
def harness(private_redis_server, tmp_path):
    return Harness(private_redis_server.url, tmp_path / "jobs", tmp_path / "audit.jsonl")


@pytest.fixture
def audit_lines():
    """The audit lines written while the test runs (the audit logger is one per process, its file
    the first AuditLog's: a handler of our own sees every line)."""
    lines: list[dict] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(record.getMessage()))

    handler = Collect()
    logging.getLogger(AUDIT_LOGGER).addHandler(handler)
    yield lines
    logging.getLogger(AUDIT_LOGGER).removeHandler(handler)


async def _running(*coroutines):
    return [asyncio.create_task(coroutine) for coroutine in coroutines]


async def _stop(tasks):
    for task in tasks:
        task.cancel()
    done, _ = await asyncio.wait(tasks, timeout=10)
    assert done == set(tasks), "a runner did not stop when cancelled"


async def _eventually(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@pytest.mark.asyncio
async def test_a_job_is_owned_counted_against_its_cap_and_found_only_by_its_owner(harness):
    job = harness.new_job()
    assert isinstance(await harness.store.submit(job, 1, None), Created)
    assert isinstance(await harness.store.submit(harness.new_job(), 1, None), AtCap)  # one active at most
    assert (await harness.store.lookup(job.id, "api_key:alice", time.time())).status == "queued"
    assert await harness.store.lookup(job.id, "api_key:mallory", time.time()) is FOREIGN
    assert await harness.store.lookup(new_job_id(), "api_key:alice", time.time()) is None
    assert await harness.store.state_counts() == {"queued": 1, "running": 0}


@pytest.mark.asyncio
async def test_a_job_runs_to_success_and_ends_exactly_once(harness):
    job = harness.new_job()
    await harness.store.submit(job, 10, None)
    tasks = await _running(harness.runner(EvenAligner()).run())
    try:
        record = await harness.wait_status(job.id, {"succeeded"})
    finally:
        await _stop(tasks)
    assert record.windows_done == record.windows_total == 1 and record.audio_seconds_done == SECONDS
    result = await harness.store.result(job.id)
    assert [word[0] for word in result["words"]] == TEXT.split() and result["backend"] == "even"
    again = await harness.store.finish(job.id, "failed", attempt=record.attempt, now=time.time(), owner=job.owner)
    assert again == Ended("succeeded")  # a second end writes nothing
    assert (await harness.store.get(job.id, time.time())).status == "succeeded"
    assert harness.spool_files() == []  # the audio went when the job ended
    assert await harness.store.queue_depth() == 0 and await harness.store.state_counts() == {"queued": 0, "running": 0}


@pytest.mark.asyncio
async def test_a_window_the_aligner_failed_on_is_retried_not_the_job(harness):
    job = harness.new_job()
    await harness.store.submit(job, 10, None)
    aligner = EvenAligner(failures=3)
    tasks = await _running(harness.runner(aligner).run())
    try:
        record = await harness.wait_status(job.id, {"succeeded", "failed"})
    finally:
        await _stop(tasks)
    assert record.status == "succeeded" and aligner.calls == 4 and record.windows_done == 1
    assert harness.refunds == []


@pytest.mark.asyncio
async def test_retries_exhausted_fail_the_job_as_ours_and_refund_it(harness):
    job = harness.new_job()
    await harness.store.submit(job, 10, None)
    tasks = await _running(harness.runner(EvenAligner(failures=100), window_retries=2).run())
    try:
        record = await harness.wait_status(job.id, {"succeeded", "failed"})
    finally:
        await _stop(tasks)
    assert record.status == "failed" and record.error["status"] == 503 and "Traceback" not in json.dumps(record.error)
    assert harness.refunds == [job.id]
    assert harness.spool_files() == []


@pytest.mark.asyncio
async def test_a_job_past_its_deadline_fails_with_a_clear_problem(harness):
    job = harness.new_job()
    await harness.store.submit(job, 10, None)
    tasks = await _running(harness.runner(EvenAligner(delay_s=30), run_deadline_s=0.5, run_deadline_per_audio_s=0).run())
    try:
        record = await harness.wait_status(job.id, {"failed"})
    finally:
        await _stop(tasks)
    assert record.error["status"] == 500 and "deadline" in record.error["detail"]
    assert harness.refunds == [job.id]


@pytest.mark.asyncio
async def test_a_dead_runners_job_is_redelivered_and_the_stale_attempt_cannot_end_it(harness):
    job = harness.new_job()
    await harness.store.submit(job, 10, None)
    first = await _running(harness.runner(EvenAligner(delay_s=60), consumer="runner-a").run())
    await harness.wait_status(job.id, {"running"})
    await _stop(first)  # the runner dies: its entry stays pending, unacknowledged
    started = time.monotonic()
    second = await _running(harness.runner(EvenAligner(), consumer="runner-b").run())
    try:
        record = await harness.wait_status(job.id, {"succeeded"})
    finally:
        await _stop(second)
    assert record.attempt == 2 and time.monotonic() - started >= 1.5  # claimed only once the lease (2 s) lapsed
    stale = await harness.store.finish(job.id, "failed", attempt=1, now=time.time(), owner=job.owner)
    assert stale == Ended("succeeded")


@pytest.mark.asyncio
async def test_a_job_redelivered_too_often_fails_and_is_refunded(harness):
    job = harness.new_job()
    await harness.store.submit(job, 10, None)
    for consumer in ("runner-a", "runner-b"):
        tasks = await _running(harness.runner(EvenAligner(delay_s=60), consumer=consumer, max_attempts=2).run())
        await harness.wait_status(job.id, {"running"})
        await asyncio.sleep(2.5 if consumer == "runner-b" else 0.1)
        await _stop(tasks)
    tasks = await _running(harness.runner(EvenAligner(), consumer="runner-c", max_attempts=2).run())
    try:
        record = await harness.wait_status(job.id, {"failed", "succeeded"})
    finally:
        await _stop(tasks)
    assert record.status == "failed" and "interrupted" in record.error["detail"]
    assert harness.refunds == [job.id]


@pytest.mark.asyncio
async def test_cancelling_stops_the_running_attempt_and_nothing_overwrites_it(harness):
    job = harness.new_job()
    await harness.store.submit(job, 10, None)
    aligner = EvenAligner(delay_s=60)
    tasks = await _running(harness.runner(aligner).run())
    try:
        await harness.wait_status(job.id, {"running"})
        assert isinstance(await harness.store.cancel(job.id, time.time()), Finished)
        removed = await _eventually(lambda: harness.spool_files() == [], timeout_s=20)  # a heartbeat (lease/3) saw it
        record = await harness.store.get(job.id, time.time())
    finally:
        await _stop(tasks)
    assert removed, "the runner did not remove the cancelled job's audio"
    assert record.status == "cancelled" and await harness.store.queue_depth() == 0
    assert aligner.calls == 1  # the attempt stopped; nothing started it again


@pytest.mark.asyncio
async def test_redis_restarting_mid_job_loses_nothing(harness, private_redis_server):
    job = harness.new_job()
    await harness.store.submit(job, 10, None)
    tasks = await _running(harness.runner(EvenAligner(delay_s=1.5)).run())
    try:
        await harness.wait_status(job.id, {"running"})
        private_redis_server.stop()
        await asyncio.sleep(2.5)  # the work finishes while Redis is away: the end is retried
        private_redis_server.start()
        record = await harness.wait_status(job.id, {"succeeded", "failed"}, timeout_s=60)
    finally:
        await _stop(tasks)
    assert record.status == "succeeded"
    assert [word[0] for word in (await harness.store.result(job.id))["words"]] == TEXT.split()


@pytest.mark.asyncio
async def test_ended_jobs_expire_after_their_retention_with_an_audit_line(harness, audit_lines):
    job = harness.new_job(retain_s=0.5)
    await harness.store.submit(job, 10, None)
    runner = harness.runner(EvenAligner())
    tasks = await _running(runner.run(), runner.sweep_expired())
    try:
        await harness.wait_status(job.id, {"succeeded"})
        await asyncio.sleep(1.5)
    finally:
        await _stop(tasks)
    assert await harness.store.get(job.id, time.time()) is None
    assert not await harness.redis.exists(f"test:job:{job.id}", f"test:job:{job.id}:result")
    assert await harness.store.list(job.owner, before=None, limit=10, status=None, now=time.time()) == ([], None)
    assert any(line["decision"] == "expired" and line["job_id"] == job.id for line in audit_lines)


@pytest.mark.asyncio
async def test_one_owners_long_jobs_leave_a_runner_slot_to_anothers_short_job(harness):
    long_jobs = [harness.new_job(owner="api_key:hog") for _ in range(3)]
    short = harness.new_job(owner="api_key:bob", text="a short one")
    for job in (*long_jobs, short):  # bob's job is queued last
        await harness.store.submit(job, 10, None)

    class LongForTheHog(EvenAligner):
        async def __call__(self, job: AlignmentJob) -> list[UnitTiming]:
            self.delay_s = 30.0 if job.units == tuple(TEXT.split()) else 0.0
            return await super().__call__(job)

    tasks = await _running(harness.runner(LongForTheHog(), max_running_jobs=2, max_running_per_owner=1).run())
    try:
        record = await harness.wait_status(short.id, {"succeeded"}, timeout_s=10)
        states = [(await harness.store.get(job.id, time.time())).status for job in long_jobs]
    finally:
        await _stop(tasks)
    assert record.status == "succeeded"
    assert states.count("running") == 1 and states.count("queued") == 2  # the hog runs one at a time


@pytest.mark.asyncio
async def test_a_runner_cancelled_at_any_moment_stops(harness):
    """The replica stopping cancels the runner: it stops, wherever in a Redis call it was (redis-py
    can lose a cancellation; a few times in a hundred under load)."""
    rng = np.random.default_rng(7)
    for _ in range(25):
        task = asyncio.create_task(harness.runner(EvenAligner()).run())
        await asyncio.sleep(float(rng.uniform(0.0, 1.1)))  # an XREADGROUP blocks for 1 s
        await _stop([task])


@pytest.mark.asyncio
async def test_the_orphan_sweep_deletes_old_audio_no_queued_or_running_job_holds(harness):
    held = harness.new_job()
    await harness.store.submit(held, 10, None)  # queued: no runner is running
    orphan = harness.new_job()  # moved in, never submitted: an ingress that crashed
    young = harness.new_job()  # moved in a moment ago, about to be submitted
    age(held.pcm_path, held.envelope_path, orphan.pcm_path, orphan.envelope_path, seconds=7200)
    tasks = await _running(harness.runner(EvenAligner(), orphan_sweep_s=0.1, orphan_age_s=3600).sweep_orphans())
    try:
        assert await _eventually(lambda: not os.path.exists(orphan.pcm_path), 5)
    finally:
        await _stop(tasks)
    names = {os.path.basename(path) for path in (held.pcm_path, held.envelope_path, young.pcm_path, young.envelope_path)}
    assert set(harness.spool_files()) == names


@pytest.mark.asyncio
async def test_the_orphan_sweep_deletes_nothing_while_redis_is_down(harness, private_redis_server):
    held = harness.new_job()
    await harness.store.submit(held, 10, None)
    age(held.pcm_path, held.envelope_path, seconds=7200)
    before = harness.spool_files()
    private_redis_server.stop()
    tasks = await _running(harness.runner(EvenAligner(), orphan_sweep_s=0.1, orphan_age_s=3600).sweep_orphans())
    try:
        await asyncio.sleep(3)  # several turns, each failing on Redis
        assert not any(task.done() for task in tasks)  # a failed turn does not end the loop
    finally:
        await _stop(tasks)
        private_redis_server.start()
    assert harness.spool_files() == before
