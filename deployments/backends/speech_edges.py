"""Keep word edges out of silence: no unit starts or ends inside a stretch of silence.

Aligners let a word absorb the silence next to it: on the dev set PocketSphinx starts an
utterance's first word ~30 ms early and ends its last one ~25 ms late (more after real pauses), and
Qwen3 rounds to its 80 ms grid. `keep_out_of_silence(audio, timings)` moves an edge that lies inside
silence to where the unit's speech begins (start) or ends (end), within the unit.

Silence is judged from energy: 10 ms frames, their dB on a 30 ms moving average. The floor is the
10th percentile of the frames that are not digital silence; a frame is quiet below floor + 6 dB;
silence is a run of quiet frames at least 80 ms long or one that reaches either end of the audio
(shorter quiet runs are stop closures inside speech). That only works where the recording's floor
is far below its speech: when speech (the 95th percentile) is less than 30 dB above the floor (noise
at 20 dB SNR or worse), a word's weak edges sink into the noise and energy cannot tell them from it,
so the timings are left as they are (PocketSphinx denoises such recordings first: `denoise`).

Never worse than the input's shape: an edge only moves inward, a unit with no speech frame is left
as it is, and order and non-overlap are kept.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from deployments.backends.base import SAMPLE_RATE, UnitTiming

FRAME_S = 0.01
_FRAME_SAMPLES = round(FRAME_S * SAMPLE_RATE)
_SMOOTHING_FRAMES = 3
_DIGITAL_SILENCE_DB = -90.0  # below this a frame is zeros (padding), not the recording's floor
_QUIET_ABOVE_FLOOR_DB = 6.0
_MIN_SILENCE_FRAMES = 8  # 80 ms
_MIN_SPEECH_ABOVE_FLOOR_DB = 30.0


@dataclass(frozen=True)
class Loudness:
    """A recording's 10 ms frames in dB (30 ms moving average), its floor and its speech level."""

    frames_db: np.ndarray
    floor_db: float  # 10th percentile of the frames that are not digital silence
    speech_db: float  # their 95th percentile

    @property
    def speech_above_floor_db(self) -> float:
        return self.speech_db - self.floor_db


def loudness(audio: np.ndarray) -> Loudness | None:
    """None for audio shorter than one silence, or all digital silence."""
    count = audio.size // _FRAME_SAMPLES
    if count < _MIN_SILENCE_FRAMES:
        return None
    frames = audio[: count * _FRAME_SAMPLES].reshape(count, _FRAME_SAMPLES).astype(np.float64)
    decibels = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    # Edge-padded: zero padding would lift the first and last frames' dB by a third of their level.
    padded = np.pad(decibels, _SMOOTHING_FRAMES // 2, mode="edge")
    smoothed = np.convolve(padded, np.ones(_SMOOTHING_FRAMES) / _SMOOTHING_FRAMES, mode="valid")
    recorded = smoothed[smoothed > _DIGITAL_SILENCE_DB]
    if recorded.size == 0:
        return None
    floor, speech = np.percentile(recorded, [10, 95])
    return Loudness(smoothed, float(floor), float(speech))


def silent_frames(audio: np.ndarray) -> np.ndarray | None:
    """A bool per 10 ms frame: inside silence. None when the recording is too noisy to tell."""
    measured = loudness(audio)
    if measured is None or measured.speech_above_floor_db < _MIN_SPEECH_ABOVE_FLOOR_DB:
        return None
    return _long_runs(measured.frames_db < measured.floor_db + _QUIET_ABOVE_FLOOR_DB)


def _long_runs(quiet: np.ndarray) -> np.ndarray:
    """Quiet frames in runs of at least _MIN_SILENCE_FRAMES, or in a run touching either end."""
    silent = np.zeros_like(quiet)
    edges = np.flatnonzero(np.diff(np.concatenate([[False], quiet, [False]]).astype(np.int8)))
    for start, stop in zip(edges[::2], edges[1::2]):
        if stop - start >= _MIN_SILENCE_FRAMES or start == 0 or stop == quiet.size:
            silent[start:stop] = True
    return silent


def keep_out_of_silence(audio: np.ndarray, timings: Sequence[UnitTiming]) -> list[UnitTiming]:
    """The timings with every start and end that lies inside silence moved to the unit's speech."""
    silent = silent_frames(audio)
    if silent is None:
        return list(timings)
    return [_trimmed(timing, silent) for timing in timings]


def _trimmed(timing: UnitTiming, silent: np.ndarray) -> UnitTiming:
    # The frames the unit covers; the tolerance keeps a time on the frame grid (2.62 s) on its frame.
    first = min(max(math.floor(timing.start / FRAME_S + 1e-6), 0), silent.size - 1)
    last = min(max(math.ceil(timing.end / FRAME_S - 1e-6) - 1, first), silent.size - 1)
    if not (silent[first] or silent[last]):
        return timing
    speech = np.flatnonzero(~silent[first : last + 1])
    if speech.size == 0:
        return timing  # all silence: nothing to measure against
    start = max(timing.start, (first + speech[0]) * FRAME_S) if silent[first] else timing.start
    end = min(timing.end, (first + speech[-1] + 1) * FRAME_S) if silent[last] else timing.end
    return dataclasses.replace(timing, start=start, end=max(start, end))
