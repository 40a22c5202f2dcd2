"""Windowed alignment of long files (serve_app.pipeline.windows), against a model forced aligner.

The model behaves as a forced aligner does when it is handed the wrong text for its audio: units
whose speech lies in the window get their true times; units it was given whose speech lies outside
are spread over what remains of the window past the true ones (silence, often), or, with no room
left, squeezed into its edge, stealing the edge from the last true units; and when the window holds
speech of units it was not given, the nearest given unit is stretched over it. The
windowing must recover the true times of every unit anyway. The real backends run the same code on
real speech in tests/test_long_form.py.
"""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from serve_app.pipeline.windows import ENVELOPE_FRAME_S, Window, WindowSettings, align_windowed
from serve_app.problems import Problem
from deployments.backends.base import UnitTiming

_SQUEEZED_UNIT_S = 0.05
_STOLEN_UNITS = 2  # units next to the squeezed ones lose their times too


def _speech(seed: int, utterances: int, silence_at: float | None = None, silence_s: float = 0.0):
    """True (start, end) per unit: utterances of 4-14 words, pauses of 0.2-2 s; an optional long silence."""
    rng = random.Random(seed)
    truth, t = [], 0.5
    for _ in range(utterances):
        if silence_at is not None and t >= silence_at:
            t += silence_s
            silence_at = None
        for _ in range(rng.randint(4, 14)):
            length = rng.uniform(0.15, 0.6)
            truth.append((t, t + length))
            t += length + rng.uniform(0.0, 0.08)
        t += rng.uniform(0.2, 2.0)
    return truth, t


def _envelope(truth, duration):
    envelope = np.full(int(np.ceil(duration / ENVELOPE_FRAME_S)), 1e-4, dtype=np.float32)
    for start, end in truth:
        envelope[int(start / ENVELOPE_FRAME_S) : int(end / ENVELOPE_FRAME_S)] = 0.3
    return envelope


class ModelAligner:
    def __init__(self, truth):
        self.truth = truth
        self.windows: list[Window] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def __call__(self, window: Window) -> list[UnitTiming]:
        self.windows.append(window)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0)  # let the other chain's job start: two in flight when both step
        try:
            return self._align(window)
        finally:
            self.in_flight -= 1

    def _align(self, window: Window) -> list[UnitTiming]:
        indices = range(window.first_unit, window.stop_unit)
        inside = [i for i in indices if self.truth[i][0] >= window.start and self.truth[i][1] <= window.end]
        times = {i: self.truth[i] for i in inside}
        before = [i for i in indices if i not in times and self.truth[i][0] < window.start]
        after = [i for i in indices if i not in times and i not in before]
        room_start = times[inside[-1]][1] if inside else window.start
        room_end = times[inside[0]][0] if inside else window.end
        if after:  # spread over whatever follows the last true unit; with no room, steal from it
            if window.end - room_start < len(after) * _SQUEEZED_UNIT_S:
                stolen = inside[-_STOLEN_UNITS:]
                for i in stolen:
                    times[i] = (window.end, window.end)
                room_start = times[stolen[0]][1] if stolen else window.start
            self._spread(times, after, room_start, window.end)
        if before:
            if room_end - window.start < len(before) * _SQUEEZED_UNIT_S:
                for i in inside[:_STOLEN_UNITS]:
                    times[i] = (window.start, window.start)
                room_end = window.start
            self._spread(times, before, window.start, max(room_end, window.start))
        if inside and not after and window.stop_unit < len(self.truth) and self.truth[window.stop_unit][0] < window.end:
            last = inside[-1]  # speech of units not given: the last given unit stretches over it
            times[last] = (times[last][0], window.end)
        return [UnitTiming(f"u{i}", *times[i], 1.0) for i in indices]

    @staticmethod
    def _spread(times, units, start, end):
        step = (end - start) / len(units)
        for k, i in enumerate(units):
            times[i] = (start + k * step, start + (k + 1) * step)


def _settings(max_window_s: float) -> WindowSettings:
    return WindowSettings.for_backend(max_window_s)


def _run(truth, duration, settings, aligner=None):
    aligner = aligner or ModelAligner(truth)
    units = [f"u{i}" for i in range(len(truth))]
    spans = asyncio.run(align_windowed(units, duration, _envelope(truth, duration), settings, aligner))
    return [None if span is None else (span.start, span.end) for span in spans], aligner


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_long_file_recovers_every_true_time_through_many_windows(seed):
    truth, duration = _speech(seed, utterances=160)  # ~20 min
    spans, aligner = _run(truth, duration, _settings(60.0))
    assert spans == [pytest.approx(span) for span in truth]
    assert all(window.end - window.start <= 60.0 + 1e-9 for window in aligner.windows)
    assert aligner.most_in_flight > 1  # the refining jobs run concurrently
    locating = [window for window in aligner.windows if window.locating]
    assert 0 < len(locating) < len(aligner.windows)  # the walk's windows are drafts, the segments are not


def test_a_file_within_one_window_is_one_job_with_all_its_text():
    truth, duration = _speech(4, utterances=6)
    spans, aligner = _run(truth, duration, _settings(duration + 1))
    assert aligner.windows == [Window(0.0, duration, 0, len(truth))]  # one final job, not a draft
    assert spans == [pytest.approx(span) for span in truth]


def test_a_long_silence_is_skipped_without_losing_a_word():
    truth, duration = _speech(5, utterances=60, silence_at=120.0, silence_s=400.0)
    spans, _ = _run(truth, duration, _settings(60.0))
    assert spans == [pytest.approx(span) for span in truth]


def test_speech_much_faster_than_the_file_average_still_aligns():
    """Half the file is silence, so the average rate badly underestimates the speech: the margin and the measured rate cope."""
    truth, duration = _speech(6, utterances=120)
    truth = [(start / 2, end / 2) for start, end in truth]  # twice as fast...
    duration = duration  # ...over the same file: its second half is silent
    spans, _ = _run(truth, duration, _settings(60.0))
    assert spans == [pytest.approx(span) for span in truth]


def test_a_window_with_nothing_to_trust_and_no_silence_to_skip_is_a_transcript_mismatch():
    truth, duration = _speech(7, utterances=80)

    class Smearing(ModelAligner):
        def _align(self, window):  # the first unit swallows the whole window: nothing is trustworthy
            count = window.stop_unit - window.first_unit
            return [UnitTiming("u", window.start, window.end, 1.0)] + [UnitTiming("u", window.end, window.end, 1.0)] * (count - 1)

    with pytest.raises(Problem) as refused:
        _run(truth, duration, _settings(60.0), Smearing(truth))
    assert refused.value.type.slug == "transcript-audio-mismatch"
    assert " s and " in refused.value.detail and "words 1-" in refused.value.detail


def test_a_window_failure_propagates_unchanged():
    truth, duration = _speech(8, utterances=80)

    class Failing(ModelAligner):
        def _align(self, window):
            raise Problem("service-unavailable", "the aligner failed; retry later")

    with pytest.raises(Problem) as failed:
        _run(truth, duration, _settings(60.0), Failing(truth))
    assert failed.value.type.slug == "service-unavailable"


def test_settings_refuse_windows_that_could_trust_nothing():
    with pytest.raises(ValueError):
        WindowSettings(max_window_s=60, window_s=40, guard_s=20, tail_units=8)
    with pytest.raises(ValueError):
        WindowSettings(max_window_s=60, window_s=90, guard_s=5, tail_units=8)
