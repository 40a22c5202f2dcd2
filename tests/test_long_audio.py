"""bench.long_audio: long labelled recordings built from the dev set (no Ray, no aligner)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from bench.eval_set import EvalUtterance, load_eval_set
from bench.long_audio import LongRecording, plan_recording, samples, write_wav
from deployments.backends.base import SAMPLE_RATE


@pytest.fixture(scope="module")
def source() -> list[EvalUtterance]:
    return load_eval_set()


def longest_step(source: list[EvalUtterance]) -> float:
    """The most one more utterance and its pause can add, in seconds."""
    return max(utterance.duration for utterance in source) + 2.0


@pytest.mark.parametrize("target", [1.0, 60.0, 300.0, 1800.0, 7200.0])
def test_duration_reaches_the_target_within_one_utterance_and_pause(source, target):
    plan = plan_recording(target, source=source)
    recording = plan.recording()
    assert target <= recording.duration < target + longest_step(source)
    assert recording.duration == plan.total_samples / SAMPLE_RATE
    assert recording.utterance_count == len(plan.order) == len(plan.pause_samples) + 1


def test_pauses_lie_in_the_requested_range(source):
    plan = plan_recording(600.0, seed=3, pauses=(0.5, 1.0), source=source)
    pauses = np.asarray(plan.pause_samples) / SAMPLE_RATE
    assert pauses.min() >= 0.5 - 1 / SAMPLE_RATE and pauses.max() <= 1.0 + 1 / SAMPLE_RATE
    assert pauses.max() - pauses.min() > 0.4  # drawn across the range, not one fixed length


def test_no_utterance_follows_itself_and_every_one_recurs_evenly(source):
    order = plan_recording(1800.0, seed=1, source=source).order
    assert all(first != second for first, second in zip(order, order[1:]))
    counts = np.bincount(order, minlength=len(source))
    assert counts.max() - counts.min() <= 1  # shuffled passes through the whole set


def test_the_same_seed_gives_the_same_recording_and_another_seed_another(source):
    first, again, other = (plan_recording(120.0, seed=seed, source=source) for seed in (7, 7, 8))
    assert (first.order, first.pause_samples) == (again.order, again.pause_samples)
    assert np.array_equal(samples(first), samples(again))
    assert (first.order, first.pause_samples) != (other.order, other.pause_samples)


def test_reference_words_are_the_source_words_offset_by_their_utterance_start(source):
    plan = plan_recording(60.0, seed=2, source=source)
    recording = plan.recording()
    signal = samples(plan)
    words = iter(recording.words)
    for start_sample, index, span in zip(plan.utterance_starts(), plan.order, recording.utterance_spans):
        utterance = source[index]
        offset = start_sample / SAMPLE_RATE
        assert span == pytest.approx((offset, offset + utterance.duration))
        for expected in utterance.words:
            placed = next(words)
            assert placed.word == expected.word
            assert placed.start == pytest.approx(expected.start + offset)
            assert placed.end == pytest.approx(expected.end + offset)
            # The labelled stretch of the recording is exactly the source clip's.
            start, end = round(placed.start * SAMPLE_RATE), round(placed.end * SAMPLE_RATE)
            source_start, source_end = start - start_sample, end - start_sample
            assert np.array_equal(signal[start:end], utterance.audio[source_start:source_end])
    assert next(words, None) is None
    assert recording.transcript == " ".join(
        word.word for index in plan.order for word in source[index].words
    )


def test_pauses_are_quiet_noise_not_digital_silence(source):
    plan = plan_recording(60.0, seed=4, source=source)
    signal = samples(plan)
    starts = plan.utterance_starts()
    for index, pause in enumerate(plan.pause_samples):
        begin = starts[index] + source[plan.order[index]].audio.size
        stretch = signal[begin : begin + pause]
        assert begin + pause == starts[index + 1]
        level = 20 * np.log10(np.sqrt(np.mean(stretch.astype(np.float64) ** 2)))
        assert -63 < level < -57


def test_the_streamed_wav_is_the_whole_signal(source, tmp_path):
    plan = plan_recording(90.0, seed=5, source=source)
    path = tmp_path / "long.wav"
    recording = write_wav(plan, path)
    assert isinstance(recording, LongRecording) and recording == plan.recording()
    written, rate = soundfile.read(path, dtype="float32")
    assert rate == SAMPLE_RATE and soundfile.info(path).subtype == "PCM_16"
    assert np.array_equal(written, samples(plan))


def test_a_plan_needs_a_positive_target_and_two_utterances(source):
    with pytest.raises(ValueError):
        plan_recording(0.0, source=source)
    with pytest.raises(ValueError):
        plan_recording(10.0, source=source[:1])
