"""The streaming multipart reader (serve_app.api.upload): caps, honest endings and pace.

Requests are real Starlette requests fed by an ASGI `receive` that sends the body in the chunks
(and with the pauses) each test chooses, as Serve's proxy does.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from starlette.requests import Request

from serve_app.problems import Problem
from serve_app.api.upload import UploadLimits, read_align_form

BOUNDARY = b"testboundary42"
LIMITS = UploadLimits(max_body_bytes=1 << 20, max_text_bytes=4096, idle_timeout_s=0.5, min_bytes_per_s=1000, rate_grace_s=1.0)


def part(name: str, value: bytes, headers: bytes = b"") -> bytes:
    return b"--" + BOUNDARY + b"\r\n" + b'Content-Disposition: form-data; name="' + name.encode() + b'"\r\n' + headers + b"\r\n" + value + b"\r\n"


def body(text: bytes = b"hello world", audio: bytes = b"RIFF....WAVE") -> bytes:
    return part("audio", audio, b"Content-Type: audio/wav\r\n") + part("text", text) + b"--" + BOUNDARY + b"--\r\n"


def request(chunks: list[bytes], pause_s: float = 0.0) -> Request:
    pending = list(chunks)

    async def receive() -> dict:
        if pause_s:
            await asyncio.sleep(pause_s)
        chunk = pending.pop(0) if pending else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/align",
        "headers": [(b"content-type", b"multipart/form-data; boundary=" + BOUNDARY)],
    }
    return Request(scope, receive)


async def refusal(chunks: list[bytes], pause_s: float = 0.0, limits: UploadLimits = LIMITS) -> Problem:
    with pytest.raises(Problem) as raised:
        await read_align_form(request(chunks, pause_s), limits)
    return raised.value


@pytest.mark.asyncio
async def test_a_complete_body_is_read_exactly():
    form = await read_align_form(request([body(text="caf\u00e9 au lait".encode())]), LIMITS)
    assert form.text == "caf\u00e9 au lait" and form.audio == b"RIFF....WAVE" and form.audio_content_type == "audio/wav"


@pytest.mark.asyncio
@pytest.mark.parametrize("cut", [3, 22, len(b"--" + BOUNDARY + b"--\r\n")])
async def test_a_body_without_its_closing_boundary_is_refused(cut):
    problem = await refusal([body(text=b"the words end in what")[:-cut]])
    assert problem.type.slug == "invalid-request" and "closing multipart boundary" in problem.detail


@pytest.mark.asyncio
async def test_the_crlf_after_the_closing_boundary_is_optional():
    form = await read_align_form(request([body(text=b"the words end in what")[:-2]]), LIMITS)  # RFC 2046
    assert form.text == "the words end in what"


@pytest.mark.asyncio
async def test_a_32_kb_content_disposition_is_refused_fast():
    huge = part("text", b"hello", b"X-Pad: " + b"a" * 32_000 + b"\r\n")
    started = time.perf_counter()
    problem = await refusal([huge + b"--" + BOUNDARY + b"--\r\n"])
    assert time.perf_counter() - started < 0.05
    assert problem.type.status == 400 and "headers exceed 4096 bytes" in problem.detail
    long_name = b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="text"; filename="' + b"n" * 32_000 + b'"\r\n\r\nx\r\n'
    problem = await refusal([long_name])
    assert problem.type.status == 400 and "headers exceed 4096 bytes" in problem.detail


@pytest.mark.asyncio
async def test_part_headers_are_capped_in_total_even_in_small_lines_and_chunks():
    # Four lines of 1.5 kB: each under any per-line bound, 6 kB together; sent 100 bytes at a time.
    lines = b"".join(b"X-Pad-%d: " % n + b"a" * 1500 + b"\r\n" for n in range(3))
    raw = part("text", b"hello", lines)
    problem = await refusal([raw[i : i + 100] for i in range(0, len(raw), 100)])
    assert problem.type.status == 400 and problem.detail == "a form part's headers exceed 4096 bytes"


@pytest.mark.asyncio
async def test_part_header_lines_are_counted():
    lines = b"".join(b"X-A: 1\r\n" for _ in range(4))
    problem = await refusal([part("text", b"hello", lines) + b"--" + BOUNDARY + b"--\r\n"])
    assert problem.type.status == 400 and "more than 4 header lines" in problem.detail


@pytest.mark.asyncio
async def test_a_body_that_goes_quiet_gets_a_408():
    raw = body()
    started = time.perf_counter()
    problem = await refusal([raw[:50], raw[50:]], pause_s=1.0)
    assert problem.type.slug == "request-timeout" and problem.type.status == 408
    assert "sent nothing for 0.5 s" in problem.detail
    assert time.perf_counter() - started < 1.0


@pytest.mark.asyncio
async def test_a_trickling_body_is_cut_off_after_the_grace_period():
    raw = body()  # ~200 bytes, one byte every 0.1 s: 10 bytes/s against a 1000 bytes/s minimum
    started = time.perf_counter()
    problem = await refusal([raw[i : i + 1] for i in range(len(raw))], pause_s=0.1)
    assert problem.type.slug == "request-timeout" and "slower than 1000 bytes/s" in problem.detail
    assert 1.0 <= time.perf_counter() - started < 2.0


@pytest.mark.asyncio
async def test_a_slow_but_steady_body_within_the_rate_is_accepted():
    raw = body()
    limits = UploadLimits(max_body_bytes=1 << 20, max_text_bytes=4096, idle_timeout_s=0.5, min_bytes_per_s=10, rate_grace_s=0.2)
    form = await read_align_form(request([raw[i : i + 40] for i in range(0, len(raw), 40)], pause_s=0.05), limits)
    assert form.text == "hello world"
