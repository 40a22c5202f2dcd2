"""Backend failures are per job and ours (issue 10, point 13).

A job the backend fails on (an exception, out of memory) is a `BackendFailed` for that job alone,
answered 503/500, never the 422 of an input that cannot be aligned; the Aligner's health check
replaces a replica only when a probe inference fails too. The backends here are real PocketSphinx
backends with a fault switched on; the Aligner is the deployment's own class driven in-process at
the step its batcher hands a batch to (`_run`).
"""

from __future__ import annotations

import numpy as np
import pytest

from deployments.aligner import Aligner, BackendUnhealthy
from deployments.backends.base import SAMPLE_RATE, AlignmentFailed, AlignmentJob, BackendFailed, UnitTiming
from deployments.backends.pocketsphinx import PocketSphinxBackend
from serve_app.pipeline.alignment import alignment_problem
from serve_app.settings import AlignerOptions, GraphArgs

POISON = "explode"  # a unit this test backend fails on, as a bug triggered by one input would


class FaultyPocketSphinx(PocketSphinxBackend):
    """PocketSphinx that raises on jobs holding POISON, or on every job once `broken`."""

    def __init__(self) -> None:
        super().__init__()
        self.broken: type[BaseException] | None = None

    def _align(self, job: AlignmentJob) -> list[UnitTiming]:
        if self.broken is not None:
            raise self.broken("the backend is broken")
        if POISON in job.units:
            raise RuntimeError("a bug this input triggers")
        return super()._align(job)


class RaisingBatchBackend(FaultyPocketSphinx):
    """Breaks the per-job contract: align_batch itself raises."""

    def align_batch(self, jobs):
        raise RuntimeError("the whole batch call failed")


def _job(*units: str, seconds: float = 1.0, seed: int = 0) -> AlignmentJob:
    audio = (np.random.default_rng(seed).standard_normal(round(seconds * SAMPLE_RATE)) * 0.05).astype(np.float32)
    return AlignmentJob(audio, units, "English")


@pytest.fixture(scope="module")
def backend() -> FaultyPocketSphinx:
    return FaultyPocketSphinx()


@pytest.fixture
def healthy(backend: FaultyPocketSphinx) -> FaultyPocketSphinx:
    backend.broken = None
    return backend


def _not_a_backend_failure(outcome) -> bool:
    return isinstance(outcome, (list, AlignmentFailed))


def test_one_jobs_exception_fails_that_job_alone(healthy: FaultyPocketSphinx) -> None:
    jobs = [_job("hello", "world"), _job("hello", POISON), _job("good", "morning", seed=1)]

    outcomes = healthy.align_batch(jobs)

    assert outcomes[1] == BackendFailed("RuntimeError", transient=False)
    assert _not_a_backend_failure(outcomes[0]) and _not_a_backend_failure(outcomes[2])  # aligned after it


def test_out_of_memory_is_transient_and_other_errors_are_not() -> None:
    class OutOfMemoryError(RuntimeError):  # torch.OutOfMemoryError is recognised by its name
        pass

    assert BackendFailed.from_error(OutOfMemoryError("CUDA out of memory")).transient
    assert BackendFailed.from_error(MemoryError()).transient
    assert not BackendFailed.from_error(ValueError("bad shape")).transient


def test_backend_failures_answer_5xx_and_input_failures_422() -> None:
    assert alignment_problem(BackendFailed("OutOfMemoryError", transient=True), 7).type.status == 503
    assert alignment_problem(BackendFailed("OutOfMemoryError", transient=True), 7).headers == {"Retry-After": "7"}
    assert alignment_problem(BackendFailed("RuntimeError", transient=False), 7).type.slug == "internal-error"
    assert alignment_problem(AlignmentFailed("no-alignment-found", "no path"), 7).type.status == 422
    # An unknown reason is a backend bug, not the caller's input: it was silently a 422 before.
    assert alignment_problem(AlignmentFailed("alignment-error", "?"), 7).type.slug == "internal-error"
    assert alignment_problem([UnitTiming("hello", 0.0, 0.5, 1.0)], 7) is None


def _aligner(backend: FaultyPocketSphinx, unhealthy_after_failures: int = 3) -> Aligner:
    aligner = Aligner.func_or_class(GraphArgs(backend="pocketsphinx"), backend=backend)
    aligner.reconfigure(AlignerOptions(unhealthy_after_failures=unhealthy_after_failures).model_dump())
    return aligner


@pytest.mark.asyncio
async def test_in_a_batch_only_the_bad_job_fails(healthy: FaultyPocketSphinx) -> None:
    aligner = _aligner(healthy)
    outcomes = await aligner._run([_job("hello"), _job(POISON), _job("world", seed=2)])
    assert outcomes[1] == BackendFailed("RuntimeError", transient=False)
    assert _not_a_backend_failure(outcomes[0]) and _not_a_backend_failure(outcomes[2])


@pytest.mark.asyncio
async def test_a_batch_call_that_raises_fails_its_jobs_not_the_replica() -> None:
    aligner = _aligner(RaisingBatchBackend())
    outcomes = await aligner._run([_job("hello"), _job("world")])
    assert outcomes == [BackendFailed("RuntimeError", transient=False)] * 2


@pytest.mark.asyncio
async def test_poisoned_inputs_do_not_get_a_working_replica_replaced(healthy: FaultyPocketSphinx) -> None:
    aligner = _aligner(healthy, unhealthy_after_failures=3)
    for _ in range(3):
        assert isinstance((await aligner._run([_job(POISON)]))[0], BackendFailed)
    assert aligner._failure_streak == 3
    await aligner.check_health()  # the probe inference works: healthy, streak forgiven
    assert aligner._failure_streak == 0


@pytest.mark.asyncio
async def test_a_broken_backend_fails_the_health_check(backend: FaultyPocketSphinx) -> None:
    aligner = _aligner(backend, unhealthy_after_failures=3)
    backend.broken = RuntimeError
    try:
        for expected_streak in (1, 2):
            assert isinstance((await aligner._run([_job("hello")]))[0], BackendFailed)
            await aligner.check_health()  # below the threshold: no probe, no failure
            assert aligner._failure_streak == expected_streak
        assert isinstance((await aligner._run([_job("hello")]))[0], BackendFailed)
        with pytest.raises(BackendUnhealthy):
            await aligner.check_health()
        backend.broken = None  # a success ends the streak: healthy again
        assert _not_a_backend_failure((await aligner._run([_job("hello")]))[0])
        await aligner.check_health()
    finally:
        backend.broken = None
