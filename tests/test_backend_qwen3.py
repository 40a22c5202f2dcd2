"""Qwen3Backend on a tiny random-weight checkpoint, through the real qwen_asr loading and batching.

The checkpoint's times are meaningless, so these tests check shape and policy: order, units, numeric
ranges, batched == one-by-one, per-job rejections and failures, and how loading fails.
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

from deployments.backends.base import SAMPLE_RATE, AlignmentFailed, AlignmentJob, BackendFailed, UnitTiming
from deployments.backends.qwen3 import ModelUnavailable, Qwen3Backend
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


def test_a_batch_gives_each_job_its_units_in_order_with_numeric_times(
    backend: Qwen3Backend, jobs: list[AlignmentJob]
) -> None:
    results = backend.align_batch(jobs)

    assert len(results) == len(jobs)
    for job, timings in zip(jobs, results):
        assert isinstance(timings, list), timings
        # Whitespace-split languages and single CJK characters come back unit for unit.
        assert [timing.text for timing in timings] == list(job.units)
        boundaries = [value for timing in timings for value in (timing.start, timing.end)]
        assert all(isinstance(value, float) and math.isfinite(value) for value in boundaries)
        assert all(0.0 <= value <= backend.timestamp_horizon_seconds for value in boundaries)
        assert boundaries == sorted(boundaries)  # qwen_asr repairs the sequence to be monotonic


def test_batched_results_equal_one_job_at_a_time(backend: Qwen3Backend, jobs: list[AlignmentJob]) -> None:
    # Also a clip longer than one 8 s encoder window, and one shorter than a 1 s encoder chunk.
    jobs = [
        *jobs,
        AlignmentJob(noise(12.5, seed=8), ("a", "longer", "clip"), "English"),
        AlignmentJob(noise(0.5, seed=9), ("short",), "English"),
    ]

    batched = backend.align_batch(jobs)
    alone = [backend.align_batch([job])[0] for job in jobs]

    assert batched == alone
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
