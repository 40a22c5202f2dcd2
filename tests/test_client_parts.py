"""The client's pure parts: retry waits, error pages that are not problem documents, the audio
lengths its command line reads from headers (no service needed)."""

from __future__ import annotations

import email.utils
import time

import httpx
import pytest

from aligner_client import RetryPolicy, Unavailable
from aligner_client.cli.routing import header_seconds
from aligner_client.protocol import error_of
from aligner_client.retry import parse_retry_after
from tests.support.audio import encode, tone


def test_retry_waits_follow_retry_after_capped_with_jitter_else_back_off():
    policy = RetryPolicy(max_retry_after_s=10, backoff_s=0.5, max_backoff_s=4, jitter=0.25)
    for _ in range(200):
        assert 3.0 <= policy.delay(1, 3.0) <= 3.75
        assert 10.0 <= policy.delay(1, 3600.0) <= 12.5  # capped
        assert 0.5 <= policy.delay(1, None) <= 0.625 and 1.0 <= policy.delay(2, None) <= 1.25
        assert 4.0 <= policy.delay(9, None) <= 5.0
    assert len({policy.delay(1, 3.0) for _ in range(50)}) > 1  # jittered
    assert parse_retry_after("7") == 7.0 and parse_retry_after("soon") is None and parse_retry_after(None) is None
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= parse_retry_after(in_a_minute) <= 61
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_an_error_page_that_is_not_a_problem_still_gets_its_type():
    error = error_of(httpx.Response(502, headers={"content-type": "text/html", "retry-after": "3"}, text="<html>bad gateway</html>"))
    assert isinstance(error, Unavailable) and error.status == 502 and error.retry_after_s == 3.0 and "html" not in str(error)


def test_header_lengths_of_wav_and_flac(tmp_path):
    for container, seconds in (("wav", 2.5), ("flac", 7.0)):
        path = tmp_path / f"tone.{container}"
        path.write_bytes(encode(tone(seconds, 16_000), 16_000, container))
        assert header_seconds(path) == pytest.approx(seconds, abs=0.05)
    mp3 = tmp_path / "tone.mp3"
    mp3.write_bytes(encode(tone(2.0, 16_000), 16_000, "mp3"))
    assert header_seconds(mp3) is None  # the size decides for it
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt ")
    assert header_seconds(truncated) is None


def test_an_alignment_keeps_each_words_confidence_and_flags_and_reads_older_answers():
    from aligner_client.models import Alignment

    body = {
        "id": "r1", "language": "English", "duration": 2.0, "backend": "pocketsphinx", "model": "m",
        "words": [
            {"text": "one", "start": 0.1, "end": 0.4, "confidence": 0.93, "flags": []},
            {"text": "two", "start": 0.4, "end": 0.4, "confidence": 0.0, "flags": ["interpolated"]},
        ],
    }  # fmt: skip
    alignment = Alignment.from_json(body)
    assert [(word.confidence, word.flags) for word in alignment.words] == [(0.93, ()), (0.0, ("interpolated",))]
    assert alignment.to_json() == body
    older = dict(body, words=[{"text": "one", "start": 0.1, "end": 0.4}])
    assert Alignment.from_json(older).words[0].confidence is None
