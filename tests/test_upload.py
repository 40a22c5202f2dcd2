"""The streaming multipart reader (serve_app.api.upload): caps, honest endings, pace, and the spool.

Requests are real Starlette requests fed by an ASGI `receive` that sends the body in the chunks
(and with the pauses) each test chooses, as Serve's proxy does. The audio lands in a real spool in
the test's temporary directory, which every refusal must leave empty.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import tracemalloc
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from starlette.requests import ClientDisconnect, Request

from serve_app.problems import Problem
from serve_app.api.upload import UploadLimits, read_align_form
from serve_app.media.spool import Spool
from tests.support.spool import spool_entries

BOUNDARY = b"testboundary42"
LIMITS = UploadLimits(max_body_bytes=1 << 20, max_text_bytes=4096, idle_timeout_s=0.5, min_bytes_per_s=1000, rate_grace_s=1.0)


def part(name: str, value: bytes, headers: bytes = b"") -> bytes:
    return b"--" + BOUNDARY + b"\r\n" + b'Content-Disposition: form-data; name="' + name.encode() + b'"\r\n' + headers + b"\r\n" + value + b"\r\n"


def body(text: bytes = b"hello world", audio: bytes = b"RIFF....WAVE") -> bytes:
    return part("audio", audio, b"Content-Type: audio/wav\r\n") + part("text", text) + b"--" + BOUNDARY + b"--\r\n"


def request(chunks: Iterable[bytes], pause_s: float = 0.0, then: str = "end") -> Request:
    """A request whose body is `chunks`; after the last, the body ends (`then` "end"), the client
    goes away ("disconnect") or the client sends nothing more ("stall")."""
    pending = iter(chunks)
    upcoming = next(pending, None)

    async def receive() -> dict:
        nonlocal upcoming
        if pause_s:
            await asyncio.sleep(pause_s)
        if upcoming is None and then == "disconnect":
            return {"type": "http.disconnect"}
        if upcoming is None and then == "stall":
            await asyncio.Event().wait()
        chunk, upcoming = upcoming or b"", next(pending, None)
        return {"type": "http.request", "body": chunk, "more_body": upcoming is not None or then != "end"}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/align",
        "headers": [(b"content-type", b"multipart/form-data; boundary=" + BOUNDARY)],
    }
    return Request(scope, receive)


@pytest.fixture
def spool_dir(tmp_path) -> Path:
    return tmp_path / "spool"


async def read(spool_dir: Path, chunks: Iterable[bytes], limits: UploadLimits = LIMITS, **request_options):
    return await read_align_form(request(chunks, **request_options), limits, Spool(spool_dir))


async def refusal(spool_dir: Path, chunks: Iterable[bytes], pause_s: float = 0.0, limits: UploadLimits = LIMITS) -> Problem:
    with pytest.raises(Problem) as raised:
        await read(spool_dir, chunks, limits, pause_s=pause_s)
    assert spool_entries(spool_dir) == []  # nothing of a refused upload stays behind
    return raised.value


def content(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


@pytest.mark.asyncio
async def test_a_complete_body_is_read_exactly(spool_dir):
    form = await read(spool_dir, [body(text="caf\u00e9 au lait".encode())])
    assert form.text == "caf\u00e9 au lait" and form.audio_content_type == "audio/wav"
    assert content(form.audio.path) == b"RIFF....WAVE" and form.audio.size == 12
    assert spool_entries(spool_dir) == [os.path.basename(form.audio.path)]


@pytest.mark.asyncio
@pytest.mark.parametrize("cut", [3, 22, len(b"--" + BOUNDARY + b"--\r\n")])
async def test_a_body_without_its_closing_boundary_is_refused(spool_dir, cut):
    problem = await refusal(spool_dir, [body(text=b"the words end in what")[:-cut]])
    assert problem.type.slug == "invalid-request" and "closing multipart boundary" in problem.detail


@pytest.mark.asyncio
async def test_the_crlf_after_the_closing_boundary_is_optional(spool_dir):
    form = await read(spool_dir, [body(text=b"the words end in what")[:-2]])  # RFC 2046
    assert form.text == "the words end in what"


@pytest.mark.asyncio
async def test_a_32_kb_content_disposition_is_refused_fast(spool_dir):
    huge = part("text", b"hello", b"X-Pad: " + b"a" * 32_000 + b"\r\n")
    started = time.perf_counter()
    problem = await refusal(spool_dir, [huge + b"--" + BOUNDARY + b"--\r\n"])
    assert time.perf_counter() - started < 0.05
    assert problem.type.status == 400 and "headers exceed 4096 bytes" in problem.detail
    long_name = b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="text"; filename="' + b"n" * 32_000 + b'"\r\n\r\nx\r\n'
    problem = await refusal(spool_dir, [long_name])
    assert problem.type.status == 400 and "headers exceed 4096 bytes" in problem.detail


@pytest.mark.asyncio
async def test_part_headers_are_capped_in_total_even_in_small_lines_and_chunks(spool_dir):
    # Four lines of 1.5 kB: each under any per-line bound, 6 kB together; sent 100 bytes at a time.
    lines = b"".join(b"X-Pad-%d: " % n + b"a" * 1500 + b"\r\n" for n in range(3))
    raw = part("text", b"hello", lines)
    problem = await refusal(spool_dir, [raw[i : i + 100] for i in range(0, len(raw), 100)])
    assert problem.type.status == 400 and problem.detail == "a form part's headers exceed 4096 bytes"


@pytest.mark.asyncio
async def test_part_header_lines_are_counted(spool_dir):
    lines = b"".join(b"X-A: 1\r\n" for _ in range(4))
    problem = await refusal(spool_dir, [part("text", b"hello", lines) + b"--" + BOUNDARY + b"--\r\n"])
    assert problem.type.status == 400 and "more than 4 header lines" in problem.detail


@pytest.mark.asyncio
async def test_a_body_that_goes_quiet_gets_a_408(spool_dir):
    raw = body()
    started = time.perf_counter()
    problem = await refusal(spool_dir, [raw[:50], raw[50:]], pause_s=1.0)
    assert problem.type.slug == "request-timeout" and problem.type.status == 408
    assert "sent nothing for 0.5 s" in problem.detail
    assert time.perf_counter() - started < 1.0


@pytest.mark.asyncio
async def test_a_trickling_body_is_cut_off_after_the_grace_period(spool_dir):
    raw = body()  # ~200 bytes, one byte every 0.1 s: 10 bytes/s against a 1000 bytes/s minimum
    started = time.perf_counter()
    problem = await refusal(spool_dir, [raw[i : i + 1] for i in range(len(raw))], pause_s=0.1)
    assert problem.type.slug == "request-timeout" and "slower than 1000 bytes/s" in problem.detail
    assert 1.0 <= time.perf_counter() - started < 2.0


@pytest.mark.asyncio
async def test_a_slow_but_steady_body_within_the_rate_is_accepted(spool_dir):
    raw = body()
    limits = UploadLimits(max_body_bytes=1 << 20, max_text_bytes=4096, idle_timeout_s=0.5, min_bytes_per_s=10, rate_grace_s=0.2)
    form = await read(spool_dir, [raw[i : i + 40] for i in range(0, len(raw), 40)], limits, pause_s=0.05)
    assert form.text == "hello world"


# --- the spool --------------------------------------------------------------------------------

BIG_LIMITS = UploadLimits(max_body_bytes=80 << 20, max_text_bytes=4096, idle_timeout_s=5, min_bytes_per_s=1000, rate_grace_s=1.0)
STREAM_CHUNK = os.urandom(64 * 1024)  # random: never holds the boundary


def streamed_body(audio_chunks: int, digest: hashlib._Hash, tail: bytes | None = None) -> Iterator[bytes]:
    """A body with `audio_chunks` x 64 KiB of audio, produced as it is read (hashed into `digest`),
    ending with the text part and the closing boundary, or with `tail` instead."""
    yield b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="audio"; filename="long.flac"\r\n\r\n'
    for _ in range(audio_chunks):
        digest.update(STREAM_CHUNK)
        yield STREAM_CHUNK
    yield b"\r\n" + part("text", b"a long recording") + b"--" + BOUNDARY + b"--\r\n" if tail is None else tail


@pytest.mark.asyncio
async def test_the_audio_arrives_in_the_spool_byte_identical(spool_dir):
    expected = hashlib.sha256()
    form = await read(spool_dir, streamed_body(40, expected), BIG_LIMITS)
    assert form.audio.size == 40 * len(STREAM_CHUNK) and form.audio.sha256 == expected.hexdigest()
    assert hashlib.sha256(content(form.audio.path)).hexdigest() == expected.hexdigest()
    assert form.audio_filename == "long.flac" and form.text == "a long recording"


@pytest.mark.asyncio
async def test_a_64_mib_upload_streams_through_in_bounded_memory(spool_dir):
    expected = hashlib.sha256()
    tracemalloc.start()
    try:
        form = await read(spool_dir, streamed_body(1024, expected), BIG_LIMITS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert form.audio.size == 64 << 20 and form.audio.sha256 == expected.hexdigest()
    assert peak < 2 << 20  # a few chunks in flight, never the 64 MiB


def _with_audio(*later_parts: bytes) -> bytes:
    return part("audio", STREAM_CHUNK) + b"".join(later_parts) + b"--" + BOUNDARY + b"--\r\n"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "raw, slug, detail",
    [
        pytest.param(_with_audio(), "invalid-request", "missing form field(s): text", id="missing-text"),
        pytest.param(_with_audio(part("audio", b"again")), "invalid-request", "sent more than once", id="audio-twice"),
        pytest.param(_with_audio(part("text", b"\xff\xfe")), "invalid-transcript", "not valid UTF-8", id="text-not-utf8"),
        pytest.param(_with_audio(part("text", b"t"), part("format", b"pdf")), "invalid-request", "format must be", id="bad-format"),
        pytest.param(_with_audio(part("text", b"t" * 5000)), "transcript-too-long", "exceeds 4096", id="text-too-long"),
        pytest.param(_with_audio(part("other", b"x")), "invalid-request", "unexpected form field", id="unknown-field"),
        pytest.param(_with_audio(part("text", b"t"))[:-30], "invalid-request", "closing multipart boundary", id="truncated"),
        pytest.param(_with_audio(part("text", b"t")).replace(b"\r\n--" + BOUNDARY + b"--", b"\r\n--" + BOUNDARY + b"\r\nX: y\r\n\r"), "invalid-request", "", id="malformed"),
    ],
)
async def test_a_refused_form_leaves_no_audio_in_the_spool(spool_dir, raw, slug, detail):
    problem = await refusal(spool_dir, [raw[i : i + 1000] for i in range(0, len(raw), 1000)])
    assert problem.type.slug == slug and detail in problem.detail


@pytest.mark.asyncio
async def test_a_chunked_upload_over_the_cap_leaves_no_audio(spool_dir):
    limits = UploadLimits(max_body_bytes=1 << 20, max_text_bytes=4096, idle_timeout_s=5, min_bytes_per_s=1000, rate_grace_s=1.0)
    problem = await refusal(spool_dir, streamed_body(32, hashlib.sha256()), limits=limits)  # 2 MiB, no Content-Length
    assert problem.type.status == 413


@pytest.mark.asyncio
async def test_an_upload_that_goes_quiet_mid_audio_leaves_no_audio(spool_dir):
    problem = await refusal(spool_dir, [part("audio", STREAM_CHUNK)[:40_000], STREAM_CHUNK], pause_s=0.6)
    assert problem.type.status == 408


@pytest.mark.asyncio
async def test_a_client_that_disconnects_mid_audio_leaves_no_audio(spool_dir):
    with pytest.raises(ClientDisconnect):
        await read(spool_dir, streamed_body(8, hashlib.sha256(), tail=b""), BIG_LIMITS, then="disconnect")
    assert spool_entries(spool_dir) == []


@pytest.mark.asyncio
async def test_a_cancelled_upload_leaves_no_audio(spool_dir):
    # Serve cancels the handler when its request times out or the replica shuts down.
    reading = asyncio.ensure_future(read(spool_dir, streamed_body(8, hashlib.sha256(), tail=b""), BIG_LIMITS, then="stall"))
    while not os.path.isdir(spool_dir) or not spool_entries(spool_dir):  # the audio has started
        await asyncio.sleep(0.01)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert spool_entries(spool_dir) == []
