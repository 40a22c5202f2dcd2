"""Mapping backend unit timings back onto the caller's words."""

from dataclasses import dataclass

from serve_app.text.timing import unit_spans, word_timings
from serve_app.text.transcript import parse_transcript


@dataclass
class Unit:
    text: str
    start: float
    end: float
    confidence: float = 1.0
    flags: tuple[str, ...] = ()


def parse(text: str, language: str = "English"):
    return parse_transcript(text, language, max_chars=1000, max_units=100)


def assert_well_formed(words, duration):
    for previous, current in zip(words, words[1:]):
        assert previous.start <= current.start
        assert previous.end <= current.start + 1e-9
    for word in words:
        assert 0 <= word.start <= word.end <= duration


def test_one_to_one_units_map_directly_and_multi_unit_words_span_their_units():
    transcript = parse("Hello, well-known world!")
    timings = [Unit("Hello", 0.1, 0.4), Unit("well", 0.5, 0.7), Unit("known", 0.7, 1.0), Unit("world", 1.1, 1.5)]
    words = word_timings(transcript, unit_spans(transcript.units, timings), audio_seconds=2.0)
    assert [(word.text, word.start, word.end) for word in words] == [
        ("Hello,", 0.1, 0.4),
        ("well-known", 0.5, 1.0),
        ("world!", 1.1, 1.5),
    ]


def test_backend_resplitting_is_mapped_by_characters():
    transcript = parse("안녕하세요 세계", "Korean")
    timings = [Unit("안녕", 0.0, 0.3), Unit("하세요", 0.3, 0.8), Unit("세계", 0.9, 1.2)]
    words = word_timings(transcript, unit_spans(transcript.units, timings), audio_seconds=2.0)
    assert [(word.start, word.end) for word in words] == [(0.0, 0.8), (0.9, 1.2)]


def test_words_without_time_get_zero_length_next_to_neighbours():
    transcript = parse("— one & two")
    timings = [Unit("one", 0.5, 0.9), Unit("two", 1.0, 1.4)]
    words = word_timings(transcript, unit_spans(transcript.units, timings), audio_seconds=2.0)
    assert [(word.text, word.start, word.end) for word in words] == [("—", 0.5, 0.5), ("one", 0.5, 0.9), ("&", 0.9, 0.9), ("two", 1.0, 1.4)]


def test_dropped_units_do_not_shift_later_words():
    transcript = parse("alpha beta gamma")
    timings = [Unit("alpha", 0.0, 0.5), Unit("gamma", 1.0, 1.5)]  # the backend lost "beta"
    words = word_timings(transcript, unit_spans(transcript.units, timings), audio_seconds=2.0)
    assert [(word.start, word.end) for word in words] == [(0.0, 0.5), (0.5, 0.5), (1.0, 1.5)]


def test_out_of_range_and_non_monotonic_times_are_repaired():
    transcript = parse("a b c d")
    timings = [Unit("a", -0.3, 0.6), Unit("b", 0.4, 0.2), Unit("c", 0.3, 9.0), Unit("d", 5.0, 7.0)]
    words = word_timings(transcript, unit_spans(transcript.units, timings), audio_seconds=3.0)
    assert_well_formed(words, 3.0)
    assert words[0].start == 0.0
    assert words[-1].end == 3.0
    assert len(words) == 4


def test_a_word_is_as_sure_as_its_least_sure_unit_and_carries_every_flag():
    transcript = parse("well-known world")
    timings = [Unit("well", 0.5, 0.7, 0.9), Unit("known", 0.7, 1.0, 0.4, ("repaired",)), Unit("world", 1.1, 1.5, 0.8)]
    words = word_timings(transcript, unit_spans(transcript.units, timings), audio_seconds=2.0)
    assert [(word.confidence, word.flags) for word in words] == [(0.4, ("repaired",)), (0.8, ())]


def test_a_word_no_unit_of_which_got_a_time_is_interpolated_with_no_confidence():
    transcript = parse("alpha beta gamma")
    timings = [Unit("alpha", 0.0, 0.5, 0.9), Unit("gamma", 1.0, 1.5, 0.9)]
    words = word_timings(transcript, unit_spans(transcript.units, timings), audio_seconds=2.0)
    assert [(word.confidence, word.flags) for word in words] == [(0.9, ()), (0.0, ("interpolated",)), (0.9, ())]


def test_resplit_units_are_as_sure_as_the_least_sure_item_covering_them():
    transcript = parse("안녕하세요 세계", "Korean")
    timings = [Unit("안녕", 0.0, 0.3, 0.9), Unit("하세요", 0.3, 0.8, 0.3, ("interpolated",)), Unit("세계", 0.9, 1.2, 0.7)]
    words = word_timings(transcript, unit_spans(transcript.units, timings), audio_seconds=2.0)
    assert [(word.confidence, word.flags) for word in words] == [(0.3, ("interpolated",)), (0.7, ())]


def test_confidence_is_clamped_into_zero_to_one():
    transcript = parse("a b")
    timings = [Unit("a", 0.0, 0.5, 1.7), Unit("b", 0.5, 1.0, -0.2)]
    words = word_timings(transcript, unit_spans(transcript.units, timings), audio_seconds=2.0)
    assert [word.confidence for word in words] == [1.0, 0.0]
