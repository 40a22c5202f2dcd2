"""Transcript validation and the split into the caller's words and alignment units."""

import pytest

from serve_app.text.transcript import TranscriptRejected, check_plausible, parse_transcript


def parse(text: str, language: str = "English", max_chars: int = 1000, max_units: int = 100):
    return parse_transcript(text, language, max_chars=max_chars, max_units=max_units)


def test_words_keep_punctuation_and_units_follow_qwen3_cleaning():
    transcript = parse("Hello, well-known world — don’t 3.5!")
    assert [word.text for word in transcript.words] == ["Hello,", "well-known", "world", "—", "don’t", "3.5!"]
    assert [word.units for word in transcript.words] == [("Hello",), ("well", "known"), ("world",), (), ("don't",), ("3", "5")]
    assert transcript.units == ("Hello", "well", "known", "world", "don't", "3", "5")


def test_chinese_is_one_word_per_character_with_punctuation_attached():
    transcript = parse("「你好，世界」 OK吗？", "Chinese")
    assert [word.text for word in transcript.words] == ["「你", "好，", "世", "界」", "OK", "吗？"]
    assert transcript.units == ("你", "好", "世", "界", "OK", "吗")


def test_japanese_kana_are_character_units():
    transcript = parse("こんにちは、世界。", "Japanese")
    assert transcript.units == tuple("こんにちは世界")
    assert transcript.words[4].text == "は、"


def test_space_languages_still_split_ideographs_into_units_like_qwen3():
    transcript = parse("say 你好 now")
    assert [word.text for word in transcript.words] == ["say", "你好", "now"]
    assert transcript.words[1].units == ("你", "好")


def test_nfd_input_is_normalised_for_units_but_returned_as_sent():
    decomposed = "cafe\u0301"
    transcript = parse(decomposed, "French")
    assert transcript.words[0].text == decomposed
    assert transcript.units == ("café",)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "invalid-transcript"),
        ("   \n ", "invalid-transcript"),
        ("— … !!", "invalid-transcript"),
        ("abc \u202e evil", "invalid-transcript"),
        ("abc \u2066 isolate", "invalid-transcript"),
        ("nul\x00byte", "invalid-transcript"),
        ("bell\x07", "invalid-transcript"),
        ("x" * 1001, "transcript-too-long"),
        (" ".join(["word"] * 101), "transcript-too-long"),
    ],
)
def test_rejections(text, reason):
    with pytest.raises(TranscriptRejected) as rejected:
        parse(text)
    assert rejected.value.reason == reason


_INVISIBLE = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u200e", "\u200f", "\u061c", "\u00ad", "\u180e", "\U000e0041"]
_EMOJI_PARTS = ("\u200d", "\U000e0041")  # between spaces they may build an emoji sequence: tested below


@pytest.mark.parametrize(
    "text",
    [f"wh{char}at now" for char in _INVISIBLE]
    + [f"what now{char}" for char in _INVISIBLE]
    + [f"what {char} now" for char in _INVISIBLE if char not in _EMOJI_PARTS],
)
def test_invisible_format_characters_are_refused_naming_the_code_point(text):
    invisible = next(char for char in text if char in _INVISIBLE)
    with pytest.raises(TranscriptRejected) as rejected:
        parse(text)
    assert rejected.value.reason == "invalid-transcript"
    assert f"U+{ord(invisible):04X}" in rejected.value.detail


def test_a_leading_byte_order_mark_is_removed_and_nothing_else_changes():
    transcript = parse("\ufeffHello, world")
    assert [word.text for word in transcript.words] == ["Hello,", "world"]
    with pytest.raises(TranscriptRejected):
        parse("\ufeff\ufeffHello")  # only the first one is a byte-order mark


def test_emoji_sequences_keep_their_joiners_and_tags():
    family, scotland = "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"
    transcript = parse(f"hi {family} {scotland} bye")
    assert [word.text for word in transcript.words] == ["hi", family, scotland, "bye"]
    assert transcript.units == ("hi", "bye")


def test_tabs_and_newlines_are_allowed():
    assert parse("one\ttwo\r\nthree").units == ("one", "two", "three")


def test_plausibility_is_language_aware():
    many_words = parse(" ".join(["word"] * 30))
    check_plausible(many_words, 4.0)  # 30 words in 4 s: fast but possible
    with pytest.raises(TranscriptRejected):
        check_plausible(many_words, 1.0)
    characters = parse("你" * 40, "Chinese")
    check_plausible(characters, 3.0)  # 40 characters in 3 s is within the CJK rate
    with pytest.raises(TranscriptRejected):
        check_plausible(parse(" ".join(["word"] * 40)), 3.0)  # 40 words in 3 s is not
