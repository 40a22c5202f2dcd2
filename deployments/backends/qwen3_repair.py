"""Find Qwen3-ForcedAligner's implausible timestamps, and replace them: re-aligned, else interpolated.

The model answers every unit in one pass, with no notion of "unsure"; its known failures are
zero-length or repeated timestamps, units piling up at the end of the audio, and timestamps out of
order (which qwen_asr's `fix_timestamp` silently overwrites). Here, on the raw argmax times:

1. `implausible_spans` finds the units whose times cannot be right (its docstring gives the rules).
2. `plan_repair` chooses, for at most `MAX_REPAIR_SPANS` spans per job, a smaller audio window to
   re-align that span alone: from the last plausible unit's end before it to the next plausible
   unit's start after it, plus `REPAIR_MARGIN_STEPS` of audio either side. The caller aligns all
   windows (of all its jobs) in one more batched model call: one repair round, never more. The
   windows of a job are disjoint apart from their margins, so the round costs at most about one
   more pass over the job's audio.
3. `repaired_timings` keeps each re-aligned unit that is plausible within its window and fits
   between its plausible neighbours (flag `REPAIRED`, the re-alignment's confidence), and places
   every other implausible unit between its neighbours in proportion to its character count (flag
   `INTERPOLATED`, confidence 0.0).

Failure policy: pure functions over model output, which raise on no value of it. A span that cannot
be re-aligned (beyond the span limit, under one step of room, the whole job, or a repair call that
failed: `None`) is interpolated, never returned as the model gave it and never failing the job. The
result always has one timing per unit, in order, every time within [0, duration] and
non-decreasing from one boundary to the next.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

from deployments.backends.base import UnitTiming
from serve_app.text.flags import INTERPOLATED, REPAIRED

MAX_REPAIR_SPANS = 8  # per job; more separate broken spans means a broadly broken answer: interpolate the rest
REPAIR_MARGIN_STEPS = 2  # audio either side of a re-aligned span, for the onset/offset context
PILE_UP_MIN_UNITS = 3  # fewer trailing units in the last steps are a tight but possible ending
_EPSILON = 0.0005  # times are rounded to the millisecond: compare thresholds within half of one

Bounds = tuple[float, float]  # (start, end) of one unit, seconds


@dataclass(frozen=True)
class RawAlignment:
    """One model pass over a sequence of units: argmax times and their confidence, unrepaired."""

    words: tuple[str, ...]
    bounds: tuple[Bounds, ...]  # one per word, seconds from the start of the audio it was given
    confidences: tuple[float, ...]  # one per word, 0..1


@dataclass(frozen=True)
class Window:
    """An implausible span and the audio to re-align it on, in seconds of the job's audio."""

    units: range  # indices of the span's units in the job
    start: float  # the audio to re-align: the room plus a margin either side, within the audio
    end: float
    earliest: float  # the room, between the plausible neighbours' end and start, where the
    latest: float  # re-aligned units must lie


@dataclass(frozen=True)
class RepairPlan:
    implausible: tuple[range, ...]  # every implausible span, in order
    windows: tuple[Window, ...]  # those to re-align; the rest are interpolated


def implausible_spans(bounds: Sequence[Bounds], duration: float, step: float) -> list[range]:
    """The runs of consecutive units whose raw times are implausible, in order.

    `bounds` are the model's raw (start, end) per unit, `duration` the audio's length and `step`
    the model's time grid (0.08 s), all in seconds. A unit is implausible when any rule holds:
    - beyond the audio: a time more than one step past the audio's end (one step of slack for the
      grid's rounding). Every other time is clamped to the audio's end first.
    - out of order: one of its times is outside a longest non-decreasing subsequence of all the
      in-range times in spoken order (start, end, start, end...): the values qwen_asr's
      `fix_timestamp` would overwrite, except that beyond-audio values are left out, so that they
      cannot outvote the good ones.
    - zero length: start == end (after the clamping).
    - shared start: it is one of two or more consecutive units with the same start time.
    - pile-up at the end: it is one of the job's last m >= PILE_UP_MIN_UNITS units which all start
      within the audio's last m steps (one step or less per unit: 12.5 units/s, faster than any
      speech); m is the largest such count. Units stacked at the head's horizon (400 s) are beyond
      any shorter audio, and piled up at the end of audio that long.
    """
    clamped = _clamped(bounds, duration)
    beyond = {
        index
        for index, unit in enumerate(bounds)
        if not all(time <= duration + step + _EPSILON for time in unit)  # argmax steps are never negative
    }
    in_range = [index for index in range(len(bounds)) if index not in beyond]
    in_range_times = [time for index in in_range for time in clamped[index]]
    out_of_order = {in_range[position // 2] for position in _outside_longest_ordered_run(in_range_times)}
    zero_length = {index for index in in_range if clamped[index][0] == clamped[index][1]}
    implausible = beyond | out_of_order | zero_length | _shared_starts(bounds) | _piled_up(clamped, duration, step)
    return _runs(sorted(implausible))


def plan_repair(bounds: Sequence[Bounds], duration: float, step: float) -> RepairPlan:
    """The implausible spans, and a window to re-align for each of the first MAX_REPAIR_SPANS that can be.

    Not re-aligned: a span covering every unit (its window would be the first pass's whole input
    again, and the same answer) and a span with under one step of room between its neighbours
    (no unit fits there on the model's grid).
    """
    spans = implausible_spans(bounds, duration, step)
    clamped = _clamped(bounds, duration)
    margin = REPAIR_MARGIN_STEPS * step
    windows = []
    for span in spans[:MAX_REPAIR_SPANS]:
        earliest = clamped[span.start - 1][1] if span.start > 0 else 0.0
        latest = clamped[span.stop][0] if span.stop < len(bounds) else duration
        if len(span) == len(bounds) or latest - earliest < step - _EPSILON:
            continue
        start, end = round(max(0.0, earliest - margin), 3), round(min(duration, latest + margin), 3)
        windows.append(Window(span, start, end, earliest, latest))
    return RepairPlan(tuple(spans), tuple(windows))


def repaired_timings(
    raw: RawAlignment,
    duration: float,
    step: float,
    plan: RepairPlan,
    realigned: Sequence[RawAlignment | None],
) -> list[UnitTiming]:
    """Every unit's final timing: plausible as given, re-aligned, or interpolated.

    `realigned` holds one answer per `plan.windows` entry, in the window's own time (0 = the
    window's start), or None where the repair call failed.
    """
    implausible = {index for span in plan.implausible for index in span}
    known = {
        index: UnitTiming(raw.words[index], start, end, raw.confidences[index])
        for index, (start, end) in enumerate(_clamped(raw.bounds, duration))
        if index not in implausible
    }
    for window, answer in zip(plan.windows, realigned):
        if answer is not None:
            known.update(_accepted(window, answer, step))
    return _interpolated(raw.words, known, duration)


def _accepted(window: Window, answer: RawAlignment, step: float) -> dict[int, UnitTiming]:
    """The re-aligned units that are plausible in their window and keep a length between the neighbours."""
    if len(answer.bounds) != len(window.units):  # not this span's units: nothing in it can be trusted
        return {}
    still_implausible = {
        position for span in implausible_spans(answer.bounds, window.end - window.start, step) for position in span
    }
    accepted = {}
    for position, (start, end) in enumerate(answer.bounds):
        start, end = (round(_within(window.start + time, window.earliest, window.latest), 3) for time in (start, end))
        if position not in still_implausible and end > start:
            unit = window.units[position]
            accepted[unit] = UnitTiming(answer.words[position], start, end, answer.confidences[position], (REPAIRED,))
    return accepted


def _interpolated(words: Sequence[str], known: dict[int, UnitTiming], duration: float) -> list[UnitTiming]:
    """`known` completed: each run of missing units shares its neighbours' gap by character count."""
    timings: list[UnitTiming] = []
    index = 0
    while index < len(words):
        if index in known:
            timings.append(known[index])
            index += 1
            continue
        stop = next((later for later in range(index, len(words)) if later in known), len(words))
        earliest = timings[-1].end if timings else 0.0
        latest = known[stop].start if stop < len(words) else duration
        timings.extend(_spread(words[index:stop], earliest, latest))
        index = stop
    return timings


def _spread(words: Sequence[str], earliest: float, latest: float) -> list[UnitTiming]:
    weights = [max(len(word), 1) for word in words]
    total = sum(weights)
    timings, before = [], 0
    for word, weight in zip(words, weights):
        start = round(earliest + (latest - earliest) * before / total, 3)
        before += weight
        end = round(earliest + (latest - earliest) * before / total, 3)
        timings.append(UnitTiming(word, start, end, 0.0, (INTERPOLATED,)))
    return timings


def _clamped(bounds: Sequence[Bounds], duration: float) -> list[Bounds]:
    return [(min(start, duration), min(end, duration)) for start, end in bounds]


def _within(time: float, earliest: float, latest: float) -> float:
    return min(max(time, earliest), latest)


def _outside_longest_ordered_run(values: Sequence[float]) -> set[int]:
    """Positions outside one longest non-decreasing subsequence of `values` (patience sorting, O(n log n))."""
    tail_values: list[float] = []  # the smallest last value of an ordered run of each length
    tail_positions: list[int] = []
    previous = [-1] * len(values)
    for position, value in enumerate(values):
        length = bisect.bisect_right(tail_values, value)
        previous[position] = tail_positions[length - 1] if length else -1
        if length == len(tail_values):
            tail_values.append(value)
            tail_positions.append(position)
        else:
            tail_values[length] = value
            tail_positions[length] = position
    kept = set()
    position = tail_positions[-1] if tail_positions else -1
    while position != -1:
        kept.add(position)
        position = previous[position]
    return set(range(len(values))) - kept


def _shared_starts(bounds: Sequence[Bounds]) -> set[int]:
    return {
        index
        for index in range(len(bounds))
        if any(0 <= other < len(bounds) and bounds[other][0] == bounds[index][0] for other in (index - 1, index + 1))
    }


def _piled_up(clamped: Sequence[Bounds], duration: float, step: float) -> set[int]:
    earliest_start, piled = float("inf"), 0
    for count in range(1, len(clamped) + 1):
        earliest_start = min(earliest_start, clamped[-count][0])
        if count >= PILE_UP_MIN_UNITS and earliest_start >= duration - count * step - _EPSILON:
            piled = count
    return set(range(len(clamped) - piled, len(clamped)))


def _runs(indices: Sequence[int]) -> list[range]:
    """Sorted indices -> maximal ranges of consecutive ones."""
    runs: list[range] = []
    for index in indices:
        if runs and runs[-1].stop == index:
            runs[-1] = range(runs[-1].start, index + 1)
        else:
            runs.append(range(index, index + 1))
    return runs
