"""Map a backend's unit timings back onto the caller's words, clamped to the audio and monotonic.

Backends may re-split units (Qwen3 runs its own Japanese/Korean tokenisers) or drop some, so the
mapping goes through characters: every kept character of the transcript's units is matched to the
backend item that covers it, and a unit takes the span of the items covering its characters.
Whatever cannot be matched is placed next to its neighbours with zero length rather than invented.

`unit_spans` matches one backend answer to the units it was asked for (per window, for long files:
serve_app.pipeline.windows); `word_timings` turns the spans of all units into the caller's words.

Guarantees of `word_timings` (tested): one entry per input word, in order, text unchanged;
0 <= start <= end <= audio duration; starts never decrease and no word ends after the next starts.
A word's confidence is its least confident unit's, and it carries every flag of its units; a word
no unit of which got a time is placed with confidence 0 and flagged `interpolated`.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Protocol, Sequence

from serve_app.text.flags import INTERPOLATED
from serve_app.text.transcript import Transcript


class UnitTiming(Protocol):
    """What a backend returns per unit (deployments.backends.base.UnitTiming satisfies it)."""

    text: str
    start: float
    end: float
    confidence: float
    flags: tuple[str, ...]


@dataclass(frozen=True)
class Span:
    """Where a unit (or a stretch of units) was aligned: seconds, how sure, and any flags."""

    start: float
    end: float
    confidence: float
    flags: tuple[str, ...] = ()

    @classmethod
    def of(cls, timing: UnitTiming) -> "Span":
        return cls(timing.start, timing.end, timing.confidence, tuple(timing.flags))

    @classmethod
    def covering(cls, spans: Iterable["Span"]) -> "Span":
        """From the first start to the last end, as sure as the least sure, with every flag."""
        spans = list(spans)
        flags = dict.fromkeys(flag for span in spans for flag in span.flags)
        return cls(
            min(span.start for span in spans),
            max(span.end for span in spans),
            min(span.confidence for span in spans),
            tuple(flags),
        )


@dataclass(frozen=True)
class WordTiming:
    text: str
    start: float
    end: float
    confidence: float | None  # 0..1; None only in job results stored before confidence existed
    flags: tuple[str, ...] = ()


def _fold(text: str) -> str:
    """Characters compared between our units and a backend's items."""
    return "".join(char for char in unicodedata.normalize("NFC", text).casefold() if not char.isspace())


def _char_spans(units: Sequence[str], items: Sequence[UnitTiming]) -> list[Span | None]:
    """Spans for units whose text a backend re-split: match characters, take the covering items."""
    unit_of_char = [index for index, unit in enumerate(units) for _ in _fold(unit)]
    item_of_char = [index for index, item in enumerate(items) for _ in _fold(item.text)]
    ours, theirs = "".join(_fold(unit) for unit in units), "".join(_fold(item.text) for item in items)
    covering: list[dict[int, Span]] = [{} for _ in units]  # per unit: the items covering its characters
    for block in SequenceMatcher(a=ours, b=theirs, autojunk=False).get_matching_blocks():
        for offset in range(block.size):
            item_index = item_of_char[block.b + offset]
            covering[unit_of_char[block.a + offset]][item_index] = Span.of(items[item_index])
    return [Span.covering(found.values()) if found else None for found in covering]


def unit_spans(units: Sequence[str], timings: Sequence[UnitTiming]) -> list[Span | None]:
    """A (start, end) per unit, or None for a unit the backend gave no time.

    Whole units are matched first, so a dropped unit cannot pull its neighbours' characters; only
    the stretches that differ (a unit re-split or merged by the backend) are matched by character.
    """
    spans: list[Span | None] = [None] * len(units)
    matcher = SequenceMatcher(a=[_fold(unit) for unit in units], b=[_fold(item.text) for item in timings], autojunk=False)
    for tag, unit_start, unit_end, item_start, item_end in matcher.get_opcodes():
        if tag == "equal":
            for offset in range(unit_end - unit_start):
                spans[unit_start + offset] = Span.of(timings[item_start + offset])
        elif tag == "replace":
            spans[unit_start:unit_end] = _char_spans(units[unit_start:unit_end], timings[item_start:item_end])
    return spans


def word_timings(transcript: Transcript, spans: Sequence[Span | None], audio_seconds: float) -> list[WordTiming]:
    """One timing per word of `transcript`, from a span (or None) per unit of it."""
    raw: list[Span | None] = []
    unit_index = 0
    for word in transcript.words:
        word_spans = [span for span in spans[unit_index : unit_index + len(word.units)] if span is not None]
        unit_index += len(word.units)
        raw.append(Span.covering(word_spans) if word_spans else None)
    return _monotonic(transcript, raw, audio_seconds)


def _monotonic(transcript: Transcript, raw: list[Span | None], audio_seconds: float) -> list[WordTiming]:
    """Clamp to [0, duration], make starts non-decreasing and words non-overlapping.

    A word with no time sits at the end of the previous word (or at the start of the next timed
    word when it comes first), with zero length.
    """
    next_timed_start = [0.0] * len(raw)
    upcoming = audio_seconds
    for index in range(len(raw) - 1, -1, -1):
        if raw[index] is not None:
            upcoming = raw[index].start
        next_timed_start[index] = upcoming

    def clamp(value: float) -> float:
        return min(max(float(value), 0.0), audio_seconds)

    starts: list[float] = []
    ends: list[float] = []
    for index, span in enumerate(raw):
        previous_start = starts[-1] if starts else 0.0
        if span is None:
            anchor = ends[-1] if ends else next_timed_start[index]
            start = end = max(clamp(anchor), previous_start)
        else:
            start = max(clamp(span.start), previous_start)
            end = max(clamp(span.end), start)
        if ends and ends[-1] > start:
            ends[-1] = start  # keeps ends[-1] >= starts[-1] because start >= previous_start
        starts.append(start)
        ends.append(end)
    return [
        WordTiming(word.text, round(start, 3), round(end, 3), *_sureness(span))
        for word, start, end, span in zip(transcript.words, starts, ends, raw)
    ]


def _sureness(span: Span | None) -> tuple[float, tuple[str, ...]]:
    if span is None:
        return 0.0, (INTERPOLATED,)
    return round(min(max(span.confidence, 0.0), 1.0), 3), span.flags
