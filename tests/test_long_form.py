"""Long files through the real graph: streamed intake, windowed alignment, stitched words.

The 5 min recording is built from the hand-labelled dev set (bench.long_audio), so PocketSphinx's
answer is scored against human word times. The tiny Qwen3 checkpoint's times are random: with
30 s windows (tests/conftest.py) its answer for real speech is the refusal a garbage aligner earns
(no window finds the text well inside it), after its windows went through the real batching
Aligner deployment. Every request must leave the spool empty.
"""

from __future__ import annotations

import numpy as np
import pytest
from ray import serve

from bench.eval_set import score_alignments
from bench.long_audio import plan_recording, samples
from deployments.backends.base import SAMPLE_RATE, UnitTiming
from tests.support.audio import encode
from tests.test_api import assert_problem, assert_well_formed, post_align
from tests.support.spool import spool_entries

pytestmark = pytest.mark.usefixtures("serve_url")

_FIVE_MINUTES = 300.0


@pytest.fixture(scope="module")
def five_minutes():
    plan = plan_recording(_FIVE_MINUTES, seed=3)
    flac = encode(samples(plan)[np.newaxis, :], SAMPLE_RATE, "flac")
    return plan.recording(), flac


def _aligner_jobs(app_name: str) -> int:
    sizes = serve.get_deployment_handle("Aligner", app_name=app_name).batch_sizes.remote().result()
    return sum(size * count for size, count in sizes.items())


def _assert_spool_empty(spool_dir):
    assert [name for name in spool_entries(spool_dir) if (spool_dir / name).is_file()] == []  # jobs/ holds queued jobs


def test_five_minutes_align_in_windows_as_well_as_utterance_by_utterance(client, five_minutes, spool_dir):
    recording, flac = five_minutes
    jobs_before = _aligner_jobs("aligner")
    response = post_align(client, flac, recording.transcript)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["duration"] == pytest.approx(recording.duration, abs=0.01)
    assert [word["text"] for word in body["words"]] == [word.word for word in recording.words]
    assert_well_formed(body["words"], body["duration"])
    hypothesis = [UnitTiming(word["text"], word["start"], word["end"], word["confidence"]) for word in body["words"]]
    report = score_alignments([(recording.words, hypothesis)])
    assert report.missing_words == 0
    assert report.mean_ms < 25.0  # one by one: ~18 ms (docs/benchmarks.md)
    assert _aligner_jobs("aligner") - jobs_before > _FIVE_MINUTES / 90  # windows, not one job
    _assert_spool_empty(spool_dir)


def test_a_transcript_longer_than_the_speech_is_a_mismatch_naming_the_words_and_time_range(client, five_minutes, spool_dir):
    recording, _ = five_minutes
    # The first half of the recording, then silence: half the transcript is never spoken.
    audio = samples(plan_recording(_FIVE_MINUTES, seed=3))
    audio[audio.size // 2 :] = np.random.default_rng(5).standard_normal(audio.size - audio.size // 2) * 0.001
    response = post_align(client, encode(audio[np.newaxis, :], SAMPLE_RATE, "flac"), recording.transcript)
    body = assert_problem(response, 422, "transcript-audio-mismatch")
    assert "words" in body["detail"] and " s and " in body["detail"]
    _assert_spool_empty(spool_dir)


def test_qwen3_windows_real_speech_and_refuses_what_its_random_weights_cannot_place(client, five_minutes, spool_dir):
    recording, flac = five_minutes
    jobs_before = _aligner_jobs("qwen3")
    body = assert_problem(post_align(client, flac, recording.transcript, prefix="/qwen3"), 422, "transcript-audio-mismatch")
    assert "between" in body["detail"]
    assert _aligner_jobs("qwen3") > jobs_before
    _assert_spool_empty(spool_dir)
