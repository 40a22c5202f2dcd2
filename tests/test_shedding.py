"""Load shedding policy, tested directly: it is deterministic given samples and the clock."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.security.shedding import LoadSample, LoadShedder, SheddingOptions


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sample(aligner_load: int = 0, aligner_capacity: int = 10, batch_wait_s: float = 0.0, scanner_backlog: int = 0) -> LoadSample:
    return LoadSample(
        aligner_ongoing=min(aligner_load, aligner_capacity),
        aligner_queued=max(0, aligner_load - aligner_capacity),
        aligner_capacity=aligner_capacity,
        batch_wait_s=batch_wait_s,
        scanner_backlog=scanner_backlog,
        scanner_capacity=4,
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def shedder(clock) -> LoadShedder:
    return LoadShedder(SheddingOptions(), clock=clock)


def test_no_sample_means_unknown_load_and_nothing_shed(shedder):
    assert shedder.level == 0 and shedder.load_factor == 1
    assert not shedder.should_shed(0)


def test_level_is_the_most_loaded_stage(shedder):
    shedder.update(sample(aligner_load=5))
    assert shedder.level == pytest.approx(0.5)
    shedder.update(sample(aligner_load=5, scanner_backlog=3))
    assert shedder.level == pytest.approx(0.75)
    shedder.update(sample(aligner_load=5, batch_wait_s=0.45))
    assert shedder.level == pytest.approx(0.9)  # 0.45 s of a 0.5 s target batch wait


def test_load_factor_is_one_until_the_threshold_then_shrinks_to_the_floor(shedder):
    factors = {}
    for load in (5, 7, 8, 10, 20):
        shedder.update(sample(aligner_load=load))
        factors[load] = shedder.load_factor
    assert factors[5] == factors[7] == 1
    assert factors[8] == pytest.approx(1 - 0.75 * (0.1 / 0.3))
    assert factors[10] == factors[20] == pytest.approx(0.25)


def test_lowest_priority_is_shed_first_and_premium_last(shedder):
    shed_at = {}
    for load in range(0, 20):
        shedder.update(sample(aligner_load=load))
        for priority in (0, 5, 10):
            if priority not in shed_at and shedder.should_shed(priority):
                shed_at[priority] = load / 10
    assert shed_at == {0: 0.9, 5: 1.2, 10: 1.5}
    assert shedder.shed_count > 0


def test_stale_sample_means_unknown_load(shedder, clock):
    shedder.update(sample(aligner_load=30))
    assert shedder.should_shed(10)
    clock.now += shedder.options.max_sample_age_s + 0.1
    assert shedder.level == 0 and not shedder.should_shed(0)


def test_no_aligner_capacity_sheds_everything(shedder):
    shedder.update(sample(aligner_load=0, aligner_capacity=0))
    assert shedder.should_shed(10) and shedder.load_factor == pytest.approx(0.25)


@pytest.mark.asyncio
async def test_background_sampling_keeps_the_last_good_sample_when_the_probe_fails():
    shedder = LoadShedder(SheddingOptions(sample_interval_s=0.01))
    answers = [sample(aligner_load=12), RuntimeError("probe down"), "hang", sample(aligner_load=3)]
    levels = []

    async def probe() -> LoadSample:
        answer = answers.pop(0) if answers else sample(aligner_load=3)
        if isinstance(answer, Exception):
            raise answer
        if answer == "hang":
            await asyncio.sleep(10)
        levels.append(shedder.level)
        return answer

    task = asyncio.create_task(shedder.run(probe))
    while len(levels) < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The failing and the hanging probe both kept the first sample's level in force.
    assert levels[:2] == [0, pytest.approx(1.2)]
    assert shedder.probe_failures == 2
    assert shedder.level == pytest.approx(0.3)


async def _run_with(shedder: LoadShedder, probe, until) -> list[str]:
    """Run the shedder's sampling loop until `until()` holds; the failure types it reported."""
    failures: list[str] = []
    task = asyncio.create_task(shedder.run(probe, failures.append))
    try:
        for _ in range(500):
            if until():
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    return failures


@pytest.mark.asyncio
@pytest.mark.parametrize("first", ["idle sample", "no sample"])
async def test_a_slow_probe_alone_never_sheds(first):
    """Issue 10, point 12: a probe that times out (a replica busy with one long batch answers late)
    is counted, never read as saturation; nothing is shed, not even the lowest priority."""
    shedder = LoadShedder(SheddingOptions(sample_interval_s=0.02, max_sample_age_s=0.5))
    answers = [sample(aligner_load=1)] if first == "idle sample" else []
    shed: list[bool] = []

    async def probe() -> LoadSample:
        shed.append(shedder.should_shed(0))  # what a request arriving now would get
        if answers:
            return answers.pop(0)
        await asyncio.sleep(10)  # slower than the shedder waits for
        raise AssertionError("unreachable: the shedder gives up first")

    failures = await _run_with(shedder, probe, lambda: shedder.probe_failures >= 5)
    assert shedder.probe_failures >= 5 and set(failures) == {"TimeoutError"}
    assert shed and not any(shed) and not shedder.should_shed(0)
    assert shedder.level <= 0.1 and shedder.load_factor == 1


@pytest.mark.asyncio
async def test_measured_saturation_still_sheds_and_a_later_failed_probe_does_not_raise_it():
    shedder = LoadShedder(SheddingOptions(sample_interval_s=0.02))
    answers = [sample(aligner_load=12)]

    async def probe() -> LoadSample:
        if answers:
            return answers.pop(0)
        raise ConnectionError("aligner gone")

    failures = await _run_with(shedder, probe, lambda: shedder.probe_failures >= 3)
    assert set(failures) == {"ConnectionError"}
    assert shedder.level == pytest.approx(1.2)  # the last measurement, not a made-up one
    assert shedder.should_shed(0) and not shedder.should_shed(10)


@pytest.mark.asyncio
async def test_the_aligner_reports_no_batch_wait_for_jobs_behind_a_running_batch():
    """A job waiting behind one long file is queued work (counted against capacity), not a batch
    wait: read as one, a single 3 s alignment made everyone arriving meanwhile look like overload."""
    import asyncio
    import threading

    import numpy as np

    from deployments.aligner import Aligner
    from deployments.backends.base import AlignmentJob
    from deployments.backends.pocketsphinx import PocketSphinxBackend
    from serve_app.settings import AlignerOptions, GraphArgs

    class HeldPocketSphinx(PocketSphinxBackend):
        """Real PocketSphinx whose batches wait for `release` first: one long batch in progress."""

        release = threading.Event()

        def align_batch(self, jobs):
            self.release.wait(10)
            return super().align_batch(jobs)

    aligner = Aligner.func_or_class(GraphArgs(backend="pocketsphinx"), backend=HeldPocketSphinx())
    aligner.reconfigure(AlignerOptions().model_dump())
    job = AlignmentJob(np.zeros(16000, np.float32), ("hello",), "English")
    running = asyncio.create_task(aligner.align(job))
    await asyncio.sleep(0.05)
    queued = asyncio.create_task(aligner.align(job))
    await asyncio.sleep(0.3)
    load = await aligner.load()
    assert (load["aligner_ongoing"], load["aligner_queued"], load["batch_wait_s"]) == (1, 1, 0.0)
    HeldPocketSphinx.release.set()
    await asyncio.gather(running, queued)
    assert (await aligner.load())["aligner_queued"] == 0
