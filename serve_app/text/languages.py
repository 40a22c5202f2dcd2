"""The 11 languages Qwen3-ForcedAligner supports, and the names clients may use for them.

Clients may send the English name ("German"), an ISO 639-1 or 639-2/3 code ("de", "deu", "ger"),
or a BCP 47 tag whose primary subtag is one of those ("de-AT"); matching ignores case. The
canonical name is what backends receive (Qwen3's `align()` takes these names).
"""

from __future__ import annotations

import re

LANGUAGES: dict[str, tuple[str, ...]] = {
    # canonical name: accepted codes (ISO 639-1 first)
    "Chinese": ("zh", "zho", "chi", "cmn"),
    "English": ("en", "eng"),
    "Cantonese": ("yue",),
    "French": ("fr", "fra", "fre"),
    "German": ("de", "deu", "ger"),
    "Italian": ("it", "ita"),
    "Japanese": ("ja", "jpn"),
    "Korean": ("ko", "kor"),
    "Portuguese": ("pt", "por"),
    "Russian": ("ru", "rus"),
    "Spanish": ("es", "spa"),
}

# Languages written without spaces between words: every ideograph/kana is its own alignment unit.
CHARACTER_UNIT_LANGUAGES = frozenset({"Chinese", "Cantonese", "Japanese"})

_LANGUAGE_TAG = re.compile(r"^([a-z]{2,3})(-[a-z0-9]{1,8})*$")  # BCP 47 shape: primary subtag, then subtags
_BY_ALIAS: dict[str, str] = {}
for _name, _codes in LANGUAGES.items():
    _BY_ALIAS[_name.lower()] = _name
    for _code in _codes:
        _BY_ALIAS[_code] = _name


def canonical_language(value: str) -> str | None:
    """The canonical name for a client's language value, or None when it is not supported."""
    key = value.strip().lower().replace("_", "-")
    if key in _BY_ALIAS:
        return _BY_ALIAS[key]
    tag = _LANGUAGE_TAG.match(key)
    return _BY_ALIAS.get(tag.group(1)) if tag else None


def accepted_values() -> list[str]:
    """Every accepted spelling, for error messages and the OpenAPI description."""
    return [f"{name} ({', '.join(codes)})" for name, codes in LANGUAGES.items()]
