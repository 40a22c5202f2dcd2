"""Word edges kept out of silence (deployments.backends.speech_edges), on synthetic recordings."""

from __future__ import annotations

import numpy as np
import pytest

from deployments.backends.base import SAMPLE_RATE, UnitTiming
from deployments.backends.speech_edges import keep_out_of_silence, silent_frames


def recording(speech: list[tuple[float, float]], duration: float, floor: float = 1e-4, seed: int = 0) -> np.ndarray:
    """Noise at `floor` RMS with loud noise bursts (RMS 0.1, 60 dB above it) where `speech` says."""
    rng = np.random.default_rng(seed)
    audio = rng.standard_normal(round(duration * SAMPLE_RATE)) * floor
    for start, end in speech:
        first, last = round(start * SAMPLE_RATE), round(end * SAMPLE_RATE)
        audio[first:last] = rng.standard_normal(last - first) * 0.1
    return audio.astype(np.float32)


def timing(text: str, start: float, end: float, confidence: float = 0.9) -> UnitTiming:
    return UnitTiming(text, start, end, confidence)


def test_a_first_word_that_absorbed_leading_silence_starts_where_its_speech_does():
    audio = recording([(0.50, 1.00), (1.00, 1.60)], duration=2.0)
    trimmed = keep_out_of_silence(audio, [timing("one", 0.20, 1.00), timing("two", 1.00, 1.90)])
    assert trimmed[0].start == pytest.approx(0.50, abs=0.02)  # within two 10 ms frames
    assert trimmed[1].end == pytest.approx(1.60, abs=0.02)
    assert (trimmed[0].end, trimmed[1].start) == (1.00, 1.00)  # a boundary inside speech stays


def test_both_sides_of_a_pause_come_out_of_it():
    audio = recording([(0.3, 0.8), (1.4, 1.9)], duration=2.2)
    trimmed = keep_out_of_silence(audio, [timing("before", 0.3, 1.1), timing("after", 1.1, 1.9)])
    assert trimmed[0].end == pytest.approx(0.8, abs=0.02)
    assert trimmed[1].start == pytest.approx(1.4, abs=0.02)


def test_a_short_quiet_gap_inside_speech_is_not_silence():
    """A stop closure (tens of ms) is part of the word next to it."""
    audio = recording([(0.3, 0.9), (0.95, 1.5)], duration=1.8)
    timings = [timing("stop", 0.3, 0.95), timing("next", 0.95, 1.5)]
    assert keep_out_of_silence(audio, timings) == timings


def test_edges_only_move_inward_and_confidence_and_flags_are_kept():
    audio = recording([(0.5, 1.0)], duration=1.5)
    original = UnitTiming("word", 0.6, 0.9, 0.7, ("repaired",))
    assert keep_out_of_silence(audio, [original]) == [original]  # already inside its speech
    (wide,) = keep_out_of_silence(audio, [UnitTiming("word", 0.1, 1.4, 0.7, ("repaired",))])
    assert 0.1 < wide.start <= 0.52 and 0.98 <= wide.end < 1.4
    assert (wide.confidence, wide.flags) == (0.7, ("repaired",))


def test_a_unit_with_no_speech_at_all_is_left_as_it_is():
    audio = recording([(0.2, 0.6)], duration=2.0)
    timings = [timing("spoken", 0.2, 0.6), timing("unspoken", 1.0, 1.5)]
    assert keep_out_of_silence(audio, timings)[1] == timings[1]


def test_digital_silence_padding_counts_as_silence_not_as_the_floor():
    speech = recording([(0.3, 0.8)], duration=1.1)
    padding = np.zeros(3 * SAMPLE_RATE, np.float32)
    audio = np.concatenate([padding, speech, padding])
    (trimmed,) = keep_out_of_silence(audio, [timing("word", 2.9, 4.2)])
    assert trimmed.start == pytest.approx(3.3, abs=0.02)
    assert trimmed.end == pytest.approx(3.8, abs=0.02)


def test_in_a_noisy_recording_the_timings_are_left_as_they_are():
    """10 dB below speech: weak word edges are inside the noise, energy cannot tell them apart."""
    audio = recording([(0.5, 1.0), (1.0, 1.5), (1.5, 2.0)], duration=2.5, floor=0.03)
    assert silent_frames(audio) is None
    timings = [timing("a", 0.3, 1.0), timing("b", 1.0, 1.5), timing("c", 1.5, 2.3, confidence=0.2)]
    assert keep_out_of_silence(audio, timings) == timings


def test_no_timings_and_audio_shorter_than_a_silence_are_fine():
    assert keep_out_of_silence(recording([], duration=1.0), []) == []
    short = [timing("a", 0.0, 0.05)]
    assert keep_out_of_silence(recording([(0.0, 0.05)], duration=0.05), short) == short
