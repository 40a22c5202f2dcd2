"""SRT, WebVTT and TextGrid rendering."""

from serve_app.text.formats import to_srt, to_textgrid, to_vtt
from serve_app.text.timing import WordTiming

WORDS = [WordTiming("Hello,", 0.1, 0.45, 1.0), WordTiming("<b>&", 0.45, 0.45, 0.0), WordTiming('say "hi"', 61.5, 3725.0, 0.5)]


def test_srt_numbers_cues_and_uses_comma_milliseconds():
    srt = to_srt(WORDS)
    assert srt.startswith("1\n00:00:00,100 --> 00:00:00,450\nHello,\n\n2\n")
    assert "3\n00:01:01,500 --> 01:02:05,000\nsay \"hi\"\n" in srt


def test_vtt_has_header_and_escapes_markup():
    vtt = to_vtt(WORDS)
    assert vtt.startswith("WEBVTT\n\n00:00:00.100 --> 00:00:00.450\nHello,\n")
    assert "&lt;b&gt;&amp;" in vtt and "<b>" not in vtt


def test_cue_text_cannot_break_out_of_its_cue():
    srt = to_srt([WordTiming("a\n\n-->b", 0.0, 1.0, 1.0)])
    assert srt == "1\n00:00:00,000 --> 00:00:01,000\na ->b\n"


def test_textgrid_fills_gaps_and_skips_zero_length_words():
    grid = to_textgrid(WORDS[:2], duration=1.0)
    assert 'intervals: size = 3' in grid
    assert 'text = "Hello,"' in grid
    assert "<b>&" not in grid  # zero-length: a TextGrid interval cannot be empty
    quoted = to_textgrid([WordTiming('say "hi"', 0.0, 1.0, 1.0)], duration=1.0)
    assert 'text = "say ""hi"""' in quoted
