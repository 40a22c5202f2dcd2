"""Validate a transcript and split it into the caller's words and the units a backend aligns.

A *word* is what the response reports: an exact substring of the caller's text, punctuation kept
(`"Hello,"`). A *unit* is what a backend aligns: letters, digits and apostrophes only, the same
cleaning Qwen3-ForcedAligner applies, so its units come back one for one.

- Space-separated languages: one word per whitespace token; a token's units are its runs of kept
  characters (`well-known` -> `well`, `known`), so hyphens and dots do not glue words together.
- Chinese, Cantonese, Japanese: every ideograph or kana is its own unit *and* its own word (these
  scripts do not mark word boundaries); punctuation stays with the preceding character.
- A token with no kept characters (`—`, `&`) is still a word, with no units: it gets a zero-length
  time next to its neighbour so the response keeps one entry per input word.

We validate and never rewrite: no HTML escaping, no case folding of the words returned. Failures
raise `TranscriptRejected` whose `reason` is a problem slug (serve_app.problems).

Invisible characters, one rule (docs/errors.md): a byte-order mark (U+FEFF) at the very start is
removed (Windows editors write one; it is not text). Every other format character (Unicode
category Cf: zero-width space, non-joiner and joiner, word joiner, U+FEFF elsewhere, the
left-to-right, right-to-left and Arabic letter marks, soft hyphen, bidi controls...) is refused
with a 422 naming its code point: it would make a word differ from what the caller sees without
changing how it looks. The one exception is what emoji sequences are built of, ZWJ (U+200D) and tag
characters (U+E0020-U+E007F), where no letter or digit is next to it: those words hold no units.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from serve_app.text.languages import CHARACTER_UNIT_LANGUAGES

# Bidi embedding/override/isolate controls can make displayed text differ from what is aligned
# (and from what is logged or shown to reviewers): reject them.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_ALLOWED_CONTROLS = frozenset("\t\n\r")
_BYTE_ORDER_MARK = "\ufeff"
_ZERO_WIDTH_JOINER = "\u200d"
_APOSTROPHES = {"\u2019": "'", "\u02bc": "'"}  # typographic apostrophes align like ASCII ones

# Upper bounds on speaking rate, used to refuse a transcript that cannot possibly be spoken in the
# audio (e.g. 500 words for 1 s): generous, since fast speech reaches ~6 words/s and ~9 syllables/s.
_MAX_UNITS_PER_SECOND_WORDS = 8.0
_MAX_UNITS_PER_SECOND_CHARACTERS = 12.0
_PLAUSIBILITY_SLACK_UNITS = 4


class TranscriptRejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Word:
    text: str  # exactly as the caller wrote it
    units: tuple[str, ...]  # what gets aligned; empty for punctuation-only tokens


@dataclass(frozen=True)
class Transcript:
    language: str
    words: tuple[Word, ...]

    @property
    def units(self) -> tuple[str, ...]:
        return tuple(unit for word in self.words for unit in word.units)


def is_character_unit(char: str) -> bool:
    """Ideographs (the ranges Qwen3 splits on) and Japanese kana: one unit per character."""
    code = ord(char)
    return (
        0x4E00 <= code <= 0x9FFF
        or 0x3400 <= code <= 0x4DBF
        or 0x20000 <= code <= 0x2CEAF
        or 0xF900 <= code <= 0xFAFF
        or 0x3040 <= code <= 0x30FF  # hiragana, katakana
    )


def _is_kept(char: str) -> bool:
    return char == "'" or unicodedata.category(char)[0] in "LN"


def _units_of(token: str) -> tuple[str, ...]:
    """Runs of kept characters in one token, each character unit on its own."""
    normalised = unicodedata.normalize("NFC", token)
    units: list[str] = []
    run: list[str] = []
    for char in normalised:
        char = _APOSTROPHES.get(char, char)
        if unicodedata.category(char).startswith("M"):
            continue  # combining marks neither split nor count (Qwen3 drops them too)
        if is_character_unit(char) or not _is_kept(char):
            if run:
                units.append("".join(run))
                run = []
            if is_character_unit(char):
                units.append(char)
        else:
            run.append(char)
    if run:
        units.append("".join(run))
    return tuple(unit for unit in units if unit.strip("'"))


def _segments(token: str) -> list[str]:
    """Cut a token into single character units, runs of other kept characters, and runs of the rest."""
    segments: list[str] = []
    previous_kind = ""
    for char in token:
        kind = "unit" if is_character_unit(char) else "kept" if _is_kept(char) else "other"
        if kind != "unit" and kind == previous_kind:
            segments[-1] += char
        else:
            segments.append(char)
        previous_kind = kind
    return segments


def _character_words(token: str) -> list[str]:
    """Split a token of a character-unit language into words: one per ideograph/kana or Latin run.

    Punctuation stays with the preceding word; leading punctuation with the first one.
    """
    words: list[str] = []
    pending_prefix = ""
    for segment in _segments(token):
        if not _units_of(segment):
            if words:
                words[-1] += segment
            else:
                pending_prefix += segment
            continue
        words.append(pending_prefix + segment)
        pending_prefix = ""
    if pending_prefix:
        words.append(pending_prefix)  # a token with no units at all stays one (empty) word
    return words


def validate_text(text: str, max_chars: int) -> None:
    """Character-level checks that need no language."""
    if not text.strip():
        raise TranscriptRejected("invalid-transcript", "the transcript is empty")
    if len(text) > max_chars:
        raise TranscriptRejected("transcript-too-long", f"the transcript exceeds {max_chars} characters")
    for index, char in enumerate(text):
        category = unicodedata.category(char)
        if char in _BIDI_CONTROLS:
            raise TranscriptRejected("invalid-transcript", f"the transcript contains a bidirectional control character (U+{ord(char):04X})")
        if category in ("Cc", "Cs") and char not in _ALLOWED_CONTROLS:
            raise TranscriptRejected("invalid-transcript", f"the transcript contains a control character (U+{ord(char):04X})")
        if category == "Cf" and not _joins_emoji(text, index):
            raise TranscriptRejected(
                "invalid-transcript", f"the transcript contains an invisible format character (U+{ord(char):04X}); remove it"
            )


def _joins_emoji(text: str, index: int) -> bool:
    """ZWJ or a tag character with no letter or digit on either side: part of an emoji sequence."""
    char = text[index]
    if char != _ZERO_WIDTH_JOINER and not 0xE0020 <= ord(char) <= 0xE007F:
        return False
    neighbours = text[max(0, index - 1) : index] + text[index + 1 : index + 2]
    return not any(_is_kept(neighbour) for neighbour in neighbours)


def parse_transcript(text: str, language: str, *, max_chars: int, max_units: int) -> Transcript:
    """Validate `text` and split it into words and units for `language` (a canonical name)."""
    text = text.removeprefix(_BYTE_ORDER_MARK)  # the one character ever removed (module docstring)
    validate_text(text, max_chars)
    tokens = text.split()
    if language in CHARACTER_UNIT_LANGUAGES:
        tokens = [piece for token in tokens for piece in _character_words(token)]
    words = tuple(Word(token, _units_of(token)) for token in tokens)
    transcript = Transcript(language, words)
    unit_count = len(transcript.units)
    if unit_count == 0:
        raise TranscriptRejected("invalid-transcript", "the transcript contains no letters or digits to align")
    if unit_count > max_units:
        raise TranscriptRejected("transcript-too-long", f"the transcript has {unit_count} words or characters; the limit is {max_units}")
    return transcript


def check_plausible(transcript: Transcript, audio_seconds: float) -> None:
    """Refuse a transcript far too long to be spoken in `audio_seconds` (checked after decoding)."""
    rate = _MAX_UNITS_PER_SECOND_CHARACTERS if transcript.language in CHARACTER_UNIT_LANGUAGES else _MAX_UNITS_PER_SECOND_WORDS
    allowed = int(rate * audio_seconds) + _PLAUSIBILITY_SLACK_UNITS
    unit_count = len(transcript.units)
    if unit_count > allowed:
        raise TranscriptRejected(
            "invalid-transcript",
            f"{unit_count} words or characters cannot be spoken in {audio_seconds:.1f} s of audio (at most {allowed})",
        )
