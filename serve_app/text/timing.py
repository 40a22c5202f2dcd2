"""Map a backend's unit timings back onto the caller's words, clamped to the audio and monotonic.

Backends may re-split units (Qwen3 runs its own Japanese/Korean tokenisers) or drop some, so the
mapping goes through characters: every kept character of the transcript's units is matched to the
backend item that covers it, and a unit takes the span of the items covering its characters.
Whatever cannot be matched is placed next to its neighbours with zero length rather than invented.

`unit_spans` matches one backend answer to the units it was asked for (per window, for long files:
serve_app.pipeline.windows); `word_timings` turns the spans of all units into the caller's words.

Guarantees of `word_timings` (tested): one entry per input word, in order, text unchanged;
0 <= start <= end <= audio duration; starts never decrease and no word ends after the next starts.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Protocol, Sequence

from serve_app.text.transcript import Transcript


class UnitTiming(Protocol):
    """What a backend returns per unit (deployments.backends.base.UnitTiming satisfies it)."""

    text: str
    start: float
    end: float


Span = tuple[float, float]  # (start, end) seconds


@dataclass(frozen=True)
class WordTiming:
    text: str
    start: float
    end: float


def _fold(text: str) -> str:
    """Characters compared between our units and a backend's items."""
    return "".join(char for char in unicodedata.normalize("NFC", text).casefold() if not char.isspace())


def _char_spans(units: Sequence[str], items: Sequence[UnitTiming]) -> list[Span | None]:
    """Spans for units whose text a backend re-split: match characters, take the covering items."""
    unit_of_char = [index for index, unit in enumerate(units) for _ in _fold(unit)]
    item_of_char = [index for index, item in enumerate(items) for _ in _fold(item.text)]
    ours, theirs = "".join(_fold(unit) for unit in units), "".join(_fold(item.text) for item in items)
    spans: list[Span | None] = [None] * len(units)
    for block in SequenceMatcher(a=ours, b=theirs, autojunk=False).get_matching_blocks():
        for offset in range(block.size):
            unit = unit_of_char[block.a + offset]
            item = items[item_of_char[block.b + offset]]
            current = spans[unit]
            spans[unit] = (item.start, item.end) if current is None else (min(current[0], item.start), max(current[1], item.end))
    return spans


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
                item = timings[item_start + offset]
                spans[unit_start + offset] = (item.start, item.end)
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
        raw.append((min(s for s, _ in word_spans), max(e for _, e in word_spans)) if word_spans else None)
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
            upcoming = raw[index][0]
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
            start = max(clamp(span[0]), previous_start)
            end = max(clamp(span[1]), start)
        if ends and ends[-1] > start:
            ends[-1] = start  # keeps ends[-1] >= starts[-1] because start >= previous_start
        starts.append(start)
        ends.append(end)
    return [
        WordTiming(word.text, round(start, 3), round(end, 3))
        for word, start, end in zip(transcript.words, starts, ends)
    ]
