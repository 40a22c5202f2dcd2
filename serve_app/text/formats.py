"""Output formats for word timings: SRT and WebVTT (one cue per word) and Praat TextGrid.

JSON is rendered by FastAPI from `serve_app.api.models.AlignResponse`. Text is written as the caller
sent it; each format escapes only what its own syntax needs (WebVTT's `&`, `<`, `>`; TextGrid's `"`).
"""

from __future__ import annotations

from enum import Enum
from typing import Sequence

from serve_app.text.timing import WordTiming


class OutputFormat(str, Enum):
    json = "json"
    srt = "srt"
    vtt = "vtt"
    textgrid = "textgrid"


MEDIA_TYPES = {
    OutputFormat.json: "application/json",
    OutputFormat.srt: "application/x-subrip; charset=utf-8",
    OutputFormat.vtt: "text/vtt; charset=utf-8",
    OutputFormat.textgrid: "text/plain; charset=utf-8",
}


def _clock(seconds: float, decimal_mark: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_mark}{millis:03d}"


def _one_line(text: str) -> str:
    # A cue's text must not contain a blank line (it would end the cue) nor the "-->" arrow.
    return " ".join(text.split()).replace("-->", "->")


def to_srt(words: Sequence[WordTiming]) -> str:
    cues = [
        f"{number}\n{_clock(word.start, ',')} --> {_clock(word.end, ',')}\n{_one_line(word.text)}\n"
        for number, word in enumerate(words, start=1)
    ]
    return "\n".join(cues)


def to_vtt(words: Sequence[WordTiming]) -> str:
    def escape(text: str) -> str:
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    cues = [f"{_clock(word.start, '.')} --> {_clock(word.end, '.')}\n{escape(_one_line(word.text))}\n" for word in words]
    return "WEBVTT\n\n" + "\n".join(cues)


def to_textgrid(words: Sequence[WordTiming], duration: float) -> str:
    """A long-format TextGrid with one interval tier "words"; gaps become empty intervals."""
    intervals: list[tuple[float, float, str]] = []
    cursor = 0.0
    for word in words:
        if word.start > cursor:
            intervals.append((cursor, word.start, ""))
        if word.end > word.start:  # TextGrid intervals must have positive length
            intervals.append((word.start, word.end, word.text))
            cursor = word.end
    if duration > cursor or not intervals:
        intervals.append((cursor, duration, ""))

    def quoted(text: str) -> str:
        return '"' + text.replace('"', '""') + '"'

    lines = [
        'File type = "ooTextFile"',
        'Object class = "TextGrid"',
        "",
        "xmin = 0",
        f"xmax = {duration}",
        "tiers? <exists>",
        "size = 1",
        "item []:",
        "    item [1]:",
        '        class = "IntervalTier"',
        '        name = "words"',
        "        xmin = 0",
        f"        xmax = {duration}",
        f"        intervals: size = {len(intervals)}",
    ]
    for number, (start, end, text) in enumerate(intervals, start=1):
        lines += [
            f"        intervals [{number}]:",
            f"            xmin = {start}",
            f"            xmax = {end}",
            f"            text = {quoted(text)}",
        ]
    return "\n".join(lines) + "\n"
