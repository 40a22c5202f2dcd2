"""Qwen3Backend on a tiny random-weight checkpoint, through the real qwen_asr loading and batching.

The checkpoint's times are meaningless, so these tests check shape and policy: order, units, numeric
ranges, batched == one-by-one, per-job rejections and failures, and how loading fails. Its raw times
are also pathological (every slot at 118-396 s for clips of seconds, many zero-length), which puts
the detection, re-alignment and interpolation of implausible times through the real model path.
Whether a re-alignment comes back plausible cannot be shown on random weights (the real ones cannot
be downloaded here): tests/test_qwen3_repair.py checks that logic with a stand-in for the model call.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deployments.backends.base import SAMPLE_RATE, AlignmentFailed, AlignmentJob, BackendFailed, UnitTiming
from deployments.backends.qwen3 import ModelUnavailable, Qwen3Backend, _prompt, _slot_readings
from deployments.backends.qwen3_repair import RawAlignment, implausible_spans, plan_repair
from serve_app.text.flags import FLAGS, INTERPOLATED
from serve_app.text.languages import LANGUAGES
from tests.support.tiny_qwen3 import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MAX_AUDIO_SECONDS = 20.0


def noise(seconds: float, seed: int) -> np.ndarray:
    samples = np.random.default_rng(seed).standard_normal(round(seconds * SAMPLE_RATE))
    return (0.1 * samples).astype(np.float32)


@pytest.fixture(scope="module")
def backend(tiny_checkpoint: Path) -> Qwen3Backend:
    return Qwen3Backend(
        str(tiny_checkpoint), dtype="float32", device="cpu", max_audio_seconds=MAX_AUDIO_SECONDS
    )


@pytest.fixture(scope="module")
def jobs() -> list[AlignmentJob]:
    return [
        AlignmentJob(noise(3.0, seed=1), ("the", "quick", "brown", "fox"), "English"),
        AlignmentJob(noise(2.5, seed=2), ("今", "天", "天", "气", "很", "好"), "Chinese"),
        AlignmentJob(noise(4.0, seed=3), ("grüße", "aus", "münchen"), "German"),
        AlignmentJob(noise(1.0, seed=4), ("yes",), "English"),
    ]


def test_info_describes_the_loaded_model(backend: Qwen3Backend, tiny_checkpoint: Path) -> None:
    assert backend.info.name == "qwen3"
    assert backend.info.model == str(tiny_checkpoint)
    assert backend.info.languages == frozenset(LANGUAGES)
    assert backend.info.max_audio_seconds == MAX_AUDIO_SECONDS
    # 5000 timestamp classes x 80 ms: the checkpoint kept its forced-aligner head through save/load.
    assert backend.timestamp_horizon_seconds == pytest.approx(400.0)


def assert_well_formed(timings: list[UnitTiming], duration: float) -> None:
    boundaries = [value for timing in timings for value in (timing.start, timing.end)]
    assert all(isinstance(value, float) and math.isfinite(value) for value in boundaries)
    assert all(0.0 <= value <= duration for value in boundaries)
    assert boundaries == sorted(boundaries)
    for timing in timings:
        assert 0.0 <= timing.confidence <= 1.0
        assert set(timing.flags) <= set(FLAGS)
        if INTERPOLATED in timing.flags:
            assert timing.confidence == 0.0


def test_a_batch_gives_each_job_its_units_in_order_with_numeric_times(
    backend: Qwen3Backend, jobs: list[AlignmentJob]
) -> None:
    results = backend.align_batch(jobs)

    assert len(results) == len(jobs)
    for job, timings in zip(jobs, results):
        assert isinstance(timings, list), timings
        # Whitespace-split languages and single CJK characters come back unit for unit.
        assert [timing.text for timing in timings] == list(job.units)
        assert_well_formed(timings, duration=job.audio.shape[0] / SAMPLE_RATE)


def test_the_random_models_implausible_answers_come_back_interpolated(
    backend: Qwen3Backend, jobs: list[AlignmentJob]
) -> None:
    raws = backend._forward([(job.audio, backend._words(job)) for job in jobs])
    results = backend.align_batch(jobs)

    for job, raw, timings in zip(jobs, raws, results):
        duration = job.audio.shape[0] / SAMPLE_RATE
        # Every raw time is past the end of the audio: one implausible span, the whole job.
        assert implausible_spans(raw.bounds, duration, step=0.08) == [range(len(raw.bounds))]
        assert all(timing.flags == (INTERPOLATED,) and timing.confidence == 0.0 for timing in timings)
        # Spread over the whole clip by character count, not left where the model put them.
        assert (timings[0].start, timings[-1].end) == (0.0, duration)
        lengths = [timing.end - timing.start for timing in timings]
        weights = [len(timing.text) / sum(len(unit) for unit in job.units) for timing in timings]
        assert lengths == pytest.approx([weight * duration for weight in weights], abs=0.002)


def test_our_forward_pass_is_qwen_asrs_align(backend: Qwen3Backend, jobs: list[AlignmentJob]) -> None:
    """Our raw times, put through upstream's own `fix_timestamp`, are exactly what `align()` answers."""
    raws = backend._forward([(job.audio, backend._words(job)) for job in jobs])
    upstream = backend._aligner.align(
        audio=[(job.audio, SAMPLE_RATE) for job in jobs],
        text=[" ".join(job.units) for job in jobs],
        language=[job.language for job in jobs],
    )

    fix_timestamp = backend._aligner.aligner_processor.fix_timestamp
    changed = 0
    for raw, result in zip(raws, upstream):
        ours = [time for unit in raw.bounds for time in unit]
        theirs = [time for item in result for time in (item.start_time, item.end_time)]
        fixed = [round(value / 1000, 3) for value in fix_timestamp(np.array([round(time * 1000) for time in ours]))]
        assert raw.words == tuple(item.text for item in result)
        assert fixed == theirs
        changed += ours != theirs
    assert changed  # fix_timestamp did overwrite some: a pass that skipped it would be caught


def test_raw_confidences_are_probabilities_that_do_not_depend_on_the_batch(
    backend: Qwen3Backend, jobs: list[AlignmentJob]
) -> None:
    requests = [(job.audio, backend._words(job)) for job in jobs]

    batched = backend._forward(requests)
    alone = [backend._forward([request])[0] for request in requests]

    confidences = [value for raw in batched for value in raw.confidences]
    assert all(0.0 < value <= 1.0 for value in confidences)
    assert len(set(confidences)) > 1
    for together, single in zip(batched, alone):
        assert together.bounds == single.bounds
        # Padding moves the probabilities in their last bits; two decimals can round either way.
        assert together.confidences == pytest.approx(single.confidences, abs=0.0101)


def test_a_slots_confidence_is_its_probability_within_one_step() -> None:
    logits = torch.log(
        torch.tensor(
            [
                [0.05, 0.46, 0.44, 0.05, 0.0],  # split between two adjacent steps: sure within a step
                [0.41, 0.0, 0.19, 0.0, 0.4],  # split between distant steps: unsure
                [0.7, 0.2, 0.05, 0.05, 0.0],  # argmax at the first step: one neighbour only
                [0.0, 0.0, 0.1, 0.3, 0.6],  # argmax at the last step
            ]
        )
        + 1e-9
    ).to(torch.bfloat16)

    steps, confidences = _slot_readings(logits)

    assert steps == [1, 0, 0, 4]
    assert confidences == pytest.approx([0.95, 0.41, 0.9, 0.9], abs=0.01)


def test_our_prompt_is_encode_timestamps(backend: Qwen3Backend) -> None:
    encode_timestamp = backend._aligner.aligner_processor.encode_timestamp
    for text, language in [
        ("the quick brown fox", "English"),
        ("今天 天气很好 ok", "Chinese"),
        ("今日はいい天気です", "Japanese"),
        ("오늘 날씨가 좋네요", "Korean"),
    ]:
        words, prompt = encode_timestamp(text, language)
        assert _prompt(words) == prompt


def test_implausible_spans_are_re_aligned_by_the_model_on_their_own_audio(
    backend: Qwen3Backend, jobs: list[AlignmentJob]
) -> None:
    """A synthetic first pass with a broken middle, through the real second (batched) pass."""
    job = jobs[0]  # 3 s, four units
    first = RawAlignment(job.units, ((0.0, 0.4), (0.8, 0.8), (0.8, 0.8), (2.0, 2.9)), (0.7, 0.9, 0.9, 0.6))
    plan = plan_repair(first.bounds, 3.0, step=0.08)
    (window,) = plan.windows
    start, end = round(window.start * SAMPLE_RATE), round(window.end * SAMPLE_RATE)
    answer = backend._forward([(job.audio[start:end], first.words[1:3])])[0]

    (timings,) = backend._repaired([job], [first])

    # The tiny model's re-alignment is nonsense too, so the span is interpolated between its
    # neighbours, which keep their times and confidences.
    assert implausible_spans(answer.bounds, window.end - window.start, step=0.08)
    assert timings == [
        UnitTiming("the", 0.0, 0.4, 0.7),
        UnitTiming("quick", 0.4, 1.2, 0.0, (INTERPOLATED,)),
        UnitTiming("brown", 1.2, 2.0, 0.0, (INTERPOLATED,)),
        UnitTiming("fox", 2.0, 2.9, 0.6),
    ]


def test_a_repair_call_that_fails_interpolates_that_job_alone(
    backend: Qwen3Backend, jobs: list[AlignmentJob], caplog: pytest.LogCaptureFixture
) -> None:
    # Words that no log line would contain by chance.
    good = AlignmentJob(jobs[0].audio, ("zebra", "quokka", "marmot", "wombat"), "English")
    malformed = AlignmentJob(np.zeros((3 * SAMPLE_RATE, 2, 2), dtype=np.float32), good.units, "English")
    first = RawAlignment(good.units, ((0.0, 0.4), (0.8, 0.8), (0.8, 0.8), (2.0, 2.9)), (0.7, 0.9, 0.9, 0.6))

    with caplog.at_level("WARNING", logger="deployments.backends.qwen3"):
        together = backend._repaired([good, malformed], [first, first])

    assert together[0] == backend._repaired([good], [first])[0]
    assert together[1] == together[0]  # the failed repair ends up where the nonsense one does: interpolated
    assert "re-aligning 1 implausible spans failed (ValueError)" in caplog.text
    assert not any(unit in caplog.text for unit in good.units)


def test_batched_results_equal_one_job_at_a_time(backend: Qwen3Backend, jobs: list[AlignmentJob]) -> None:
    # Also a clip longer than one 8 s encoder window, and one shorter than a 1 s encoder chunk.
    jobs = [
        *jobs,
        AlignmentJob(noise(12.5, seed=8), ("a", "longer", "clip"), "English"),
        AlignmentJob(noise(0.5, seed=9), ("short",), "English"),
    ]

    batched = backend.align_batch(jobs)
    alone = [backend.align_batch([job])[0] for job in jobs]

    assert batched == alone  # times, confidences and flags
    # Guard against a degenerate checkpoint that answers the same for every input.
    assert len({tuple(timings) for timings in batched}) > 1


def test_too_long_and_too_short_audio_fail_alone(backend: Qwen3Backend, jobs: list[AlignmentJob]) -> None:
    too_long = AlignmentJob(noise(MAX_AUDIO_SECONDS + 0.5, seed=5), ("long",), "English")
    too_short = AlignmentJob(noise(0.05, seed=6), ("short",), "English")

    results = backend.align_batch([jobs[0], too_long, jobs[1], too_short])

    assert isinstance(results[1], AlignmentFailed) and results[1].reason == "audio-too-long"
    assert isinstance(results[3], AlignmentFailed) and results[3].reason == "audio-too-short"
    assert [results[0], results[2]] == backend.align_batch([jobs[0], jobs[1]])


def test_a_job_the_model_cannot_process_fails_alone(backend: Qwen3Backend, jobs: list[AlignmentJob]) -> None:
    # A contract-breaking 3-D audio array makes qwen_asr raise for the whole batched call; the
    # backend must retry the jobs one by one so only this one fails.
    malformed = AlignmentJob(np.zeros((SAMPLE_RATE, 2, 2), dtype=np.float32), ("hello",), "English")

    results = backend.align_batch([jobs[0], malformed, jobs[2]])

    assert isinstance(results[1], BackendFailed) and not results[1].transient, results[1]  # ours: a 500
    assert [results[0], results[2]] == backend.align_batch([jobs[0], jobs[2]])


def test_units_that_qwen_cleans_away_give_no_alignment(
    backend: Qwen3Backend, jobs: list[AlignmentJob]
) -> None:
    punctuation_only = AlignmentJob(noise(1.0, seed=7), ("...", "!"), "English")

    results = backend.align_batch([punctuation_only, jobs[0]])

    assert isinstance(results[0], AlignmentFailed) and results[0].reason == "no-alignment-found"
    assert all(isinstance(timing, UnitTiming) for timing in results[1])


def test_an_empty_batch_gives_no_results(backend: Qwen3Backend) -> None:
    assert backend.align_batch([]) == []


@pytest.mark.parametrize("model", ["/nonexistent/aligner-checkpoint", "tests-absent-org/absent-aligner"])
def test_a_model_that_is_not_here_fails_fast_without_the_network(model: str) -> None:
    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match="neither a local directory nor in the Hugging Face cache"):
        Qwen3Backend(model)
    # Letting transformers try the hub offline takes ~46 s of retries; the cache lookup is instant.
    assert time.monotonic() - started < 5


def test_a_broken_checkpoint_raises_model_unavailable(tiny_checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")

    with pytest.raises(ModelUnavailable, match="could not load aligner model"):
        Qwen3Backend(str(broken), dtype="float32")


def test_settings_out_of_range_are_refused(tiny_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        Qwen3Backend(str(tiny_checkpoint), dtype="int8")
    with pytest.raises(ValueError, match="device"):
        Qwen3Backend(str(tiny_checkpoint), device="tpu")
    with pytest.raises(ValueError, match="timestamp head"):
        Qwen3Backend(str(tiny_checkpoint), max_audio_seconds=500)


def test_a_hub_id_loads_from_the_local_cache(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The production path: a hub id whose snapshot is already in HF_HUB_CACHE, no network."""
    commit = "0" * 40
    repo_cache = tmp_path / "hub" / "models--tiny-org--tiny-aligner"
    shutil.copytree(tiny_checkpoint, repo_cache / "snapshots" / commit)
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text(commit)

    # huggingface_hub reads HF_HUB_CACHE at import, hence a fresh interpreter.
    program = (
        "from deployments.backends.qwen3 import Qwen3Backend\n"
        "print(Qwen3Backend('tiny-org/tiny-aligner', dtype='float32').info.model)\n"
    )
    environment = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub")}
    completed = subprocess.run(
        [sys.executable, "-c", program],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip().splitlines()[-1] == "tiny-org/tiny-aligner"


def test_the_tiny_checkpoint_is_deterministic(tiny_checkpoint: Path, tmp_path: Path) -> None:
    again = write_tiny_checkpoint(tmp_path / "again")

    for name in ("model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json"):
        assert (again / name).read_bytes() == (tiny_checkpoint / name).read_bytes(), name
    assert (again / "model.safetensors").stat().st_size < 2_000_000
