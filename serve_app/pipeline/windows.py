"""Align audio longer than a backend's reliable range as windows, each an ordinary aligner job.

A forced aligner needs the text that belongs to the audio it is given. For a long file that text is
found in two passes:

1. **Locate** (one window after another, from the start). A window starts at the frontier, a
   quiet point just past the last unit settled so far, whose text is therefore known to start
   with the next unit; it lasts about `window_s` and ends at the quietest point of its last
   stretch. It is given the units from the frontier on, as many as the file's speaking rate (units
   per second of speech, from the envelope) says fit, less a margin: short rather than long, as
   too many words leave a forced aligner no path (PocketSphinx fails the window) while too few
   only stretch the last one over the unspoken rest. A window that still finds no path is retried
   with half the units. Only units well inside are settled: those that hold speech (a word placed
   on silence is an artefact of wrong text), end more than `guard_s` before the window's end and
   are not among the last `tail_units` it was given (unless it was given every unit left, or no
   speech follows them in the window). The
   rest is aligned again by the next window. Once the rest of the file fits in one job
   (`max_window_s`) it is the last window, with exact text at both ends, settled whole, unless
   most of its units were placed on silence (text the audio does not hold: a mismatch).
   The passes cannot start elsewhere than at a known boundary: measured on PocketSphinx, a window
   whose text starts a few words early or late is wrong throughout (docs/benchmarks.md), so the
   file is walked from its start, never from estimated midpoints or from its end.
2. **Refine** (segment by segment, following the walk). The file is cut at its pauses (quiet for `min_pause_s` or
   more, no located unit across the cut) and each segment is aligned again with exactly the units
   located in it: short, exact jobs, which is where forced aligners are most accurate (in long
   windows PocketSphinx lets an utterance's first word absorb the pause before it). A segment is
   aligned as soon as the walk has settled past it, concurrently with the walk and with the other
   segments: several aligner replicas, and their batches, share one long file. A segment that
   cannot be aligned keeps its located times; a segment longer than one job too.

A stretch with no speech (a long silence) leaves a window with nothing to settle: the walk skips
to just before the first speech in it, or, when there is none to skip to, the transcript does not
match the audio and the request is refused (422 `transcript-audio-mismatch`, naming the words and
the time range). Every step makes progress, so the number of windows is bounded.

Guarantees (tested): every unit gets a span or None (None only where the backend gave that unit
no time), absolute in the file, with the spans of each job clamped to its window. Nothing here
knows HTTP, Serve or a backend: `align` is the caller's function that runs one job.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from deployments.backends.base import SAMPLE_RATE
from serve_app.media.decode import ENVELOPE_FRAME_SAMPLES
from serve_app.problems import Problem
from serve_app.text.timing import Span, UnitTiming, unit_spans

ENVELOPE_FRAME_S = ENVELOPE_FRAME_SAMPLES / SAMPLE_RATE  # the scanner's envelope: RMS of each 10 ms frame
_SMOOTHING_FRAMES = 5  # loudness is judged on a 50 ms moving average
_SMOOTHING_S = _SMOOTHING_FRAMES * ENVELOPE_FRAME_S  # how far a word's loudness reaches past its end in that average
_CUT_SEARCH_SHARE = 0.15  # a window ends at the quietest point of its last 15 %
_LONGEST_TRUSTED_PAUSE_S = 2.5  # a longer pause before an unsettled unit is not believed
_LONGEST_QUIET_WORD_S = 0.3  # a unit this short may hold no frame at the speech level ("her", "a")
_SILENCE_SKIP_MARGIN_S = 1.0  # a skip over non-speech stops this short of the speech found
_FEWER_UNITS_RETRIES = 2  # a window the aligner finds no path for is retried with half the units
_MAX_SILENT_SHARE = 0.5  # the last window is refused when more of its units than this hold no speech


@dataclass(frozen=True)
class WindowSettings:
    """How long files are cut; `max_window_s` is the backend's reliable range for one job."""

    max_window_s: float
    window_s: float  # a locating window's length, at most max_window_s
    guard_s: float  # units ending this close to a locating window's end are not settled
    tail_units: int  # nor are the last this many units it was given
    text_margin: float = -0.3  # text given against the speaking-rate estimate, as a share of it
    min_pause_s: float = 0.15  # the refining pass cuts at pauses at least this long
    refine_concurrency: int = 8  # segment jobs in flight at once, per long file

    def __post_init__(self) -> None:
        if not 0 < self.window_s <= self.max_window_s:
            raise ValueError("window_s must be in (0, max_window_s]")
        if not 0 <= self.guard_s < self.window_s / 2:
            raise ValueError("guard_s must be below half of window_s, or a window could settle nothing")
        if not -1 < self.text_margin:
            raise ValueError("text_margin must be above -1")
        if self.refine_concurrency < 1:
            raise ValueError("refine_concurrency must be at least 1")

    @classmethod
    def for_backend(cls, max_window_s: float, refine_concurrency: int | None = None) -> "WindowSettings":
        """Locating windows of two thirds of the backend's range; the last tenth of each is guard."""
        window_s = max_window_s * 2 / 3
        settings = cls(max_window_s=max_window_s, window_s=window_s, guard_s=window_s / 10, tail_units=2)
        return settings if refine_concurrency is None else dataclasses.replace(settings, refine_concurrency=refine_concurrency)


@dataclass(frozen=True)
class Window:
    """One aligner job: audio [start, end) seconds of the file, units [first_unit, stop_unit)."""

    start: float
    end: float
    first_unit: int
    stop_unit: int
    locating: bool = False  # a walk window: its times find the text, the refining pass measures them


AlignWindow = Callable[[Window], Awaitable[Sequence[UnitTiming]]]
"""Align one window; the timings are absolute (seconds in the file). Raises Problem when it cannot."""


async def align_windowed(
    units: Sequence[str],
    duration: float,
    envelope: np.ndarray,
    settings: WindowSettings,
    align: AlignWindow,
    located: Callable[[float], None] = lambda frontier_s: None,
) -> list[Span | None]:
    """A span per unit over the whole file, aligned in as many jobs as it takes.

    `located` hears the walk's frontier (seconds) after each of its steps: progress."""
    if duration <= settings.max_window_s:
        return await _align_span(Window(0.0, duration, 0, len(units)), units, align)
    loudness = _Loudness(envelope)
    walk = _Walk(units, duration, loudness, settings, align)
    refiner = _Refiner(units, walk.spans, duration, loudness, settings, align)
    try:
        def settled(frontier_time: float, frontier_unit: int) -> None:
            refiner.settled(frontier_time, frontier_unit)
            located(frontier_time)

        await walk.run(settled)
        refiner.settled(duration, len(units), final=True)
        return await refiner.result()
    finally:
        refiner.cancel()  # a failed walk or segment ends the request: no job is left running for it


async def _align_span(window: Window, units: Sequence[str], align: AlignWindow) -> list[Span | None]:
    """The window's units' spans (unit_spans matches the backend's items back to the units)."""
    timings = await align(window)
    spans = unit_spans(units[window.first_unit : window.stop_unit], timings)
    return [None if span is None else _clamp(span, window) for span in spans]


def _clamp(span: Span, window: Window) -> Span:
    start = min(max(span.start, window.start), window.end)
    return dataclasses.replace(span, start=start, end=min(max(span.end, start), window.end))


def mismatch(window: Window) -> Problem:
    """The refusal of a window that finds no speech for its words."""
    return Problem(
        "transcript-audio-mismatch",
        f"no speech for the transcript's words {window.first_unit + 1}-{max(window.stop_unit, window.first_unit + 1)}"
        f" was found between {window.start:.1f} s and {window.end:.1f} s",
    )


class _Loudness:
    """Where speech is, from the scanner's 10 ms RMS envelope: quiet points to cut at, speech to trust.

    The speech level sits halfway (in dB) between the file's quiet floor (5th percentile of the
    envelope) and its loud level (95th percentile), so it adapts to the recording's noise.
    """

    def __init__(self, envelope: np.ndarray) -> None:
        envelope = np.asarray(envelope, dtype=np.float32)
        kernel = np.ones(_SMOOTHING_FRAMES, dtype=np.float32) / _SMOOTHING_FRAMES
        self._smoothed = np.convolve(envelope, kernel, mode="same") if envelope.size >= _SMOOTHING_FRAMES else envelope
        floor, loud = np.percentile(envelope, [5, 95]) if envelope.size else (0.0, 0.0)
        self._speech_level = float(np.sqrt(max(floor, 1e-6) * max(loud, 1e-6)))

    def _frames(self, start: float, end: float) -> tuple[int, np.ndarray]:
        first = max(int(start / ENVELOPE_FRAME_S), 0)
        return first, self._smoothed[first : max(int(math.ceil(end / ENVELOPE_FRAME_S)), first)]

    def quietest(self, start: float, end: float) -> float:
        """File time of the quietest moment in [start, end] (the midpoint when there is no frame)."""
        first, frames = self._frames(start, end)
        if frames.size == 0:
            return (start + end) / 2
        return min(max((first + int(np.argmin(frames)) + 0.5) * ENVELOPE_FRAME_S, start), end)

    def has_speech(self, start: float, end: float) -> bool:
        _, frames = self._frames(start, end)
        return bool(frames.size) and float(frames.max()) >= self._speech_level

    def speech_seconds(self, start: float, end: float) -> float:
        _, frames = self._frames(start, end)
        return float(np.count_nonzero(frames >= self._speech_level)) * ENVELOPE_FRAME_S

    def _loud_frames(self, start: float, end: float) -> np.ndarray:
        """Indices (in the whole envelope) of the frames in [start, end] at the speech level."""
        first, frames = self._frames(start, end)
        return first + np.flatnonzero(frames >= self._speech_level)

    def first_speech(self, start: float, end: float) -> float:
        """File time of the first speech in [start, end]; `end` when there is none."""
        loud = self._loud_frames(start, end)
        return int(loud[0]) * ENVELOPE_FRAME_S if loud.size else end

    def trimmed(self, span: Span) -> Span:
        """The span without its quiet start and end (a word that absorbed a pause); as is when all quiet."""
        loud = self._loud_frames(span.start, span.end)
        if not loud.size:
            return span
        start = max(span.start, int(loud[0]) * ENVELOPE_FRAME_S)
        return dataclasses.replace(span, start=start, end=min(span.end, (int(loud[-1]) + 1) * ENVELOPE_FRAME_S))

    def pause_midpoints(self, min_pause_s: float) -> list[float]:
        """The middle of every quiet stretch of at least `min_pause_s`, in file time."""
        quiet = np.concatenate(([0], (self._smoothed < self._speech_level).astype(np.int8), [0]))
        edges = np.flatnonzero(np.diff(quiet))
        starts, stops = edges[0::2], edges[1::2]
        long_enough = (stops - starts) * ENVELOPE_FRAME_S >= min_pause_s
        return [float(m) * ENVELOPE_FRAME_S for m in (starts[long_enough] + stops[long_enough]) / 2]


class _Walk:
    """The locating pass: windows from the start of the file, each settling the units well inside it."""

    def __init__(self, units: Sequence[str], duration: float, loudness: _Loudness, settings: WindowSettings, align: AlignWindow):
        self._units = units
        self._duration = duration
        self._loudness = loudness
        self._settings = settings
        self._align = align
        self.spans: list[Span | None] = [None] * len(units)  # filled in as the walk settles them
        self._frontier_time = 0.0  # everything before it is settled
        self._frontier_unit = 0  # units before it are settled
        # Units per second of speech over the whole file: pauses vary far more than speaking rate.
        self._rate = len(units) / max(loudness.speech_seconds(0.0, duration), 1e-3)

    async def run(self, settled: Callable[[float, int], None]) -> None:
        """Walk to the end of the file, telling `settled` the frontier after each step."""
        while self._frontier_unit < len(self._units):
            if self._duration - self._frontier_time <= self._settings.max_window_s:
                last = Window(self._frontier_time, self._duration, self._frontier_unit, len(self._units), locating=True)
                spans = await _align_span(last, self._units, self._align)
                silent = sum(1 for span in spans if span is None or not self._loudness.has_speech(span.start, span.end))
                if silent > len(spans) * _MAX_SILENT_SHARE:  # the text left was placed on silence
                    raise mismatch(last)
                self.spans[last.first_unit :] = spans
                break
            await self._step()
            settled(self._frontier_time, self._frontier_unit)

    async def _step(self) -> None:
        settings = self._settings
        start, first = self._frontier_time, self._frontier_unit
        target_end = start + settings.window_s
        end = self._loudness.quietest(target_end - settings.window_s * _CUT_SEARCH_SHARE, target_end)
        wanted = max(math.ceil(self._rate * self._loudness.speech_seconds(start, end) * (1 + settings.text_margin)), 1)
        for attempt in range(_FEWER_UNITS_RETRIES + 1):
            window = Window(start, end, first, min(first + wanted, len(self._units)), locating=True)
            try:
                spans = await _align_span(window, self._units, self._align)
                break
            except Problem as failed:
                if failed.type.status != 422 or attempt == _FEWER_UNITS_RETRIES or wanted == 1:
                    raise
                wanted = max(wanted // 2, 1)
        # The last units are unsettled because, with speech after them, they may have been
        # stretched over it; given every unit left, or followed by no speech, they were not.
        last = next((span for span in reversed(spans) if span is not None), None)
        exact = window.stop_unit == len(self._units) or (last is not None and not self._loudness.has_speech(last.end + _SMOOTHING_S, end))
        tail = 0 if exact else settings.tail_units
        settled = self._settled_count(spans[: max(len(spans) - tail, 0)], end)
        if settled == 0:
            self._skip_silence(window)
            return
        last_end = spans[settled - 1].end
        following = next((span.start for span in spans[settled:] if span is not None), end)
        self.spans[first : first + settled] = spans[:settled]
        self._frontier_time = self._frontier(last_end, following)
        self._frontier_unit = first + settled

    def _settled_count(self, candidates: list[Span | None], end: float) -> int:
        """How many leading candidates end well inside the window and hold speech; the last has a time."""
        settled = 0
        for index, span in enumerate(candidates):
            if span is None:
                continue
            if span.end > end - self._settings.guard_s or self._placed_on_silence(span):
                break
            settled = index + 1
        return settled

    def _placed_on_silence(self, span: Span) -> bool:
        """A unit longer than a short function word with no speech in it: an artefact of wrong text."""
        return span.end - span.start > _LONGEST_QUIET_WORD_S and not self._loudness.has_speech(span.start, span.end)

    def _frontier(self, last_end: float, following: float) -> float:
        """Where the next window starts: in the pause before the next unit, if there is one; else at the last end.

        The next unit's time is unsettled: a start far beyond the last settled end is an artefact
        (squeezed or stretched text), and searching up to it could cut inside that very unit; so
        could searching a gap too short to be a pause (a quiet short word may sit in it).
        """
        if last_end + self._settings.min_pause_s <= following <= last_end + _LONGEST_TRUSTED_PAUSE_S:
            return self._loudness.quietest(last_end, following)
        return last_end

    def _skip_silence(self, window: Window) -> None:
        """Nothing settled: skip the non-speech the window starts with, or refuse when there is none."""
        speech = self._loudness.first_speech(window.start + _SMOOTHING_S, window.end)
        skip_to = min(speech - _SILENCE_SKIP_MARGIN_S, window.end - self._settings.guard_s)
        if skip_to < window.start + _SILENCE_SKIP_MARGIN_S:
            raise mismatch(window)
        self._frontier_time = self._loudness.quietest(skip_to - _SILENCE_SKIP_MARGIN_S, skip_to)


class _Refiner:
    """The refining pass, following the walk: each segment behind the walk's frontier is final, so
    it is aligned again while the walk goes on (on another replica, when there is one)."""

    def __init__(
        self,
        units: Sequence[str],
        located: list[Span | None],
        duration: float,
        loudness: _Loudness,
        settings: WindowSettings,
        align: AlignWindow,
    ) -> None:
        self._units = units
        self._located = located  # the walk's spans, filled in as it settles them
        self._duration = duration
        self._loudness = loudness
        self._settings = settings
        self._align = align
        self._pauses = loudness.pause_midpoints(settings.min_pause_s)
        self._refined: list[Span | None] = [None] * len(units)
        self._slots = asyncio.Semaphore(settings.refine_concurrency)
        self._tasks: list[asyncio.Task] = []
        self._done_time = 0.0  # segments before this time (and before _done_unit) are launched
        self._done_unit = 0

    def settled(self, frontier_time: float, frontier_unit: int, final: bool = False) -> None:
        """The walk settled everything before (frontier_time, frontier_unit): launch its complete segments."""
        first, stop = self._done_unit, frontier_unit
        self._refined[first:stop] = self._located[first:stop]  # kept where a segment is not refined
        # Judged on their speech only: a located unit that absorbed the pause before it must not
        # keep two utterances in one segment (where it would absorb the pause again).
        speech = [None if span is None else self._loudness.trimmed(span) for span in self._located[first:stop]]
        end = self._duration if final else frontier_time
        low, high = bisect.bisect_right(self._pauses, self._done_time), bisect.bisect_left(self._pauses, end)
        segments = _segments(speech, self._done_time, end, self._pauses[low:high], first)
        if not final and segments:
            last = segments.pop()  # it may go on past the frontier: launched after the next step
            self._done_time, self._done_unit = last.start, last.first_unit
        for segment in segments:
            if segment.end - segment.start <= self._settings.max_window_s:  # longer: keeps its located times
                self._tasks.append(asyncio.ensure_future(self._refine(segment)))

    async def _refine(self, segment: Window) -> None:
        async with self._slots:
            try:
                spans = await _align_span(segment, self._units, self._align)
            except Problem as failed:
                if failed.type.status != 422:
                    raise  # our failure (5xx): the request fails, as any job's would
                return  # the input's: this segment keeps the times the walk located
            self._refined[segment.first_unit : segment.stop_unit] = spans

    async def result(self) -> list[Span | None]:
        await asyncio.gather(*self._tasks)
        return self._refined

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()


def _segments(speech: list[Span | None], start: float, end: float, pauses: list[float], unit_offset: int) -> list[Window]:
    """Pause-delimited stretches of [start, end] with the units (from `unit_offset`) whose speech is in them.

    `speech` are the units' spans of speech. A cut inside one is dropped (no unit is split), and a
    unit goes to the stretch holding its middle (never to one before its predecessor's).
    """
    timed = [span for span in speech if span is not None]
    starts = [span.start for span in timed]
    cuts = [start]
    for pause in pauses:
        before = bisect.bisect_right(starts, pause) - 1
        if cuts[-1] < pause < end and (before < 0 or timed[before].end <= pause):
            cuts.append(pause)
    cuts.append(end)
    segment_of = []
    current = 0
    for span in speech:
        if span is not None:
            current = max(current, min(bisect.bisect_right(cuts, (span.start + span.end) / 2) - 1, len(cuts) - 2))
        segment_of.append(current)
    windows = []
    first = 0
    for index in range(1, len(speech) + 1):
        if index == len(speech) or segment_of[index] != segment_of[first]:
            segment = segment_of[first]
            windows.append(Window(cuts[segment], cuts[segment + 1], unit_offset + first, unit_offset + index))
            first = index
    return windows
