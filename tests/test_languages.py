"""Language names and codes clients may send."""

import pytest

from serve_app.text.languages import LANGUAGES, canonical_language


@pytest.mark.parametrize(
    ("value", "expected"),
    [("English", "English"), ("en", "English"), ("EN-au", "English"), ("en_US", "English"), ("deu", "German"),
     ("ger", "German"), ("zh-Hant-TW", "Chinese"), ("yue", "Cantonese"), (" ja ", "Japanese")],
)
def test_names_codes_and_tags_are_accepted(value, expected):
    assert canonical_language(value) == expected


@pytest.mark.parametrize("value", ["Klingon", "xx", "en-", "e", "english-us-", "de--at", ""])
def test_unknown_or_malformed_values_are_refused(value):
    assert canonical_language(value) is None


def test_all_eleven_qwen3_languages():
    assert len(LANGUAGES) == 11
    assert all(canonical_language(name) == name for name in LANGUAGES)
