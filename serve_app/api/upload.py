"""Read the multipart body of POST /v1/align while it streams, with hard caps.

Why not `request.form()`: Starlette spools files to disk with no total cap and silently decodes
invalid UTF-8 as Latin-1. Here the body is counted as it arrives (Content-Length *and* chunked
uploads), refused with 413 the moment it passes `max_body_bytes`, each text field is capped on its
own, only the four known fields are accepted (each once, audio once), and the transcript must be
valid UTF-8. The audio goes straight into a spool file (serve_app.media.spool) as python-multipart
hands it over, so a 2 GiB upload costs this process one chunk of memory; the short fields stay in
memory under their caps. On success the caller owns the spool file (and removes it once scanned);
on any failure, a refusal, a malformed body, the client going away or the request being cancelled,
the partial file is deleted before the exception leaves read_align_form.

Failure policy, each answered before any later stage runs:
- a part's headers over `_MAX_PART_HEADER_BYTES` in total or `_MAX_PART_HEADER_LINES` lines: 400
  (python-multipart >= 0.0.27 bounds each header line too, and its parsing is linear);
- a body that ends before the closing boundary: 400, never a silently truncated last field;
- a sender that goes quiet for `idle_timeout_s`, or whose average rate stays under
  `min_bytes_per_s` once `rate_grace_s` has passed: 408 `request-timeout`, so a trickling upload
  frees its concurrency slots in seconds rather than at the server's request timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from serve_app.text.formats import OutputFormat
from serve_app.api.models import AlignForm
from serve_app.media.spool import Spool, SpoolWriter
from serve_app.problems import Problem

_FIELDS = ("audio", "text", "language", "format")
_MAX_SHORT_FIELD_BYTES = 64  # language and format values are short codes
# A part needs Content-Disposition and perhaps Content-Type; a browser sends nothing longer than a
# file name, which we keep 200 characters of anyway.
_MAX_PART_HEADER_BYTES = 4096
_MAX_PART_HEADER_LINES = 4


@dataclass(frozen=True)
class UploadLimits:
    max_body_bytes: int
    max_text_bytes: int
    idle_timeout_s: float  # longest silence between two chunks of the body
    min_bytes_per_s: float  # average body rate required once the grace period is over
    rate_grace_s: float


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    content_type: str | None = None
    data: bytearray = field(default_factory=bytearray)  # the short fields
    sink: SpoolWriter | None = None  # the audio


class _FormCollector:
    """python-multipart callbacks that collect the known fields and enforce per-field caps.

    `open_sink` is called once, when the audio part begins, for the spool writer it streams into.
    """

    def __init__(self, limits: UploadLimits, open_sink: Callable[[], SpoolWriter]):
        self._limits = limits
        self._open_sink = open_sink
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._part = _Part()
        self._header_bytes = 0
        self._header_lines = 0
        self.parts: dict[str, _Part] = {}
        self.in_part_headers = False  # where a parse error is reported as a header problem
        self.complete = False  # the closing boundary was seen

    def on_part_begin(self) -> None:
        self._part = _Part()
        self._headers = {}
        self._header_bytes = 0
        self._header_lines = 0
        self.in_part_headers = True

    def on_header_begin(self) -> None:
        self._header_lines += 1
        if self._header_lines > _MAX_PART_HEADER_LINES:
            raise Problem("invalid-request", f"a form part has more than {_MAX_PART_HEADER_LINES} header lines")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header_bytes(end - start)
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header_bytes(end - start)
        self._header_value += data[start:end]

    def _count_header_bytes(self, count: int) -> None:
        self._header_bytes += count
        if self._header_bytes > _MAX_PART_HEADER_BYTES:
            raise Problem("invalid-request", _HEADERS_TOO_LONG)

    def on_header_end(self) -> None:
        self._headers[self._header_name.strip().lower()] = self._header_value.strip()
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        self.in_part_headers = False
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("latin-1")
        if name not in _FIELDS:
            raise Problem("invalid-request", f"unexpected form field; the fields are: {', '.join(_FIELDS)}")
        if name in self.parts:
            raise Problem("invalid-request", f"the form field '{name}' was sent more than once")
        self._part.name = name
        if b"filename" in options:
            self._part.filename = options[b"filename"].decode("utf-8", errors="replace")[:200]
        if b"content-type" in self._headers:
            self._part.content_type = self._headers[b"content-type"].decode("latin-1")[:200]
        if name == "audio":
            self._part.sink = self._open_sink()
        self.parts[name] = self._part

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part.sink is not None:
            # A plain blocking write, on the event loop: it lands in the page cache, microseconds
            # per chunk, where a thread hop would cost more than the write.
            self._part.sink.write(memoryview(data)[start:end])
            return
        self._part.data += data[start:end]
        if len(self._part.data) > self._field_cap(self._part.name):
            slug = "transcript-too-long" if self._part.name == "text" else "invalid-request"
            raise Problem(slug, f"the form field '{self._part.name}' exceeds {self._field_cap(self._part.name)} bytes")

    def on_end(self) -> None:
        self.complete = True

    def _field_cap(self, name: str) -> int:
        return self._limits.max_text_bytes if name == "text" else _MAX_SHORT_FIELD_BYTES

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_begin": self.on_header_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_end": self.on_end,
        }


_HEADERS_TOO_LONG = f"a form part's headers exceed {_MAX_PART_HEADER_BYTES} bytes"


def _too_large(limits: UploadLimits) -> Problem:
    return Problem("payload-too-large", f"the request body exceeds {limits.max_body_bytes} bytes")


def _boundary(request: Request) -> bytes:
    media_type, params = parse_options_header(request.headers.get("content-type", ""))
    if media_type != b"multipart/form-data":
        raise Problem("multipart-required", "send the audio and transcript as multipart/form-data")
    boundary = params.get(b"boundary")
    if not boundary:
        raise Problem("invalid-request", "the multipart Content-Type has no boundary")
    return boundary


async def read_align_form(request: Request, limits: UploadLimits, spool: Spool) -> AlignForm:
    """The form, its audio committed to a spool file the caller must remove; Problem on refusal."""
    declared_length = request.headers.get("content-length")
    if declared_length is not None:
        if not declared_length.isdigit():
            raise Problem("invalid-request", "the Content-Length header is not a number")
        if int(declared_length) > limits.max_body_bytes:
            raise _too_large(limits)  # refused before reading a byte of the body

    boundary = _boundary(request)
    # Whatever ends this block before the audio is committed (a Problem, ClientDisconnect,
    # CancelledError) closes and deletes the partial spool file on the way out.
    with ExitStack() as partial_audio:
        collector = _FormCollector(limits, lambda: partial_audio.enter_context(spool.writer("upload")))
        # The library's own per-line bound is set to ours, so one oversized line fails at the same size.
        parser = MultipartParser(
            boundary,
            collector.callbacks(),
            max_header_count=_MAX_PART_HEADER_LINES + 1,  # ours (on_header_begin) answers first, with its own detail
            max_header_size=_MAX_PART_HEADER_BYTES,
        )
        received = 0
        try:
            async for chunk in _paced(request.stream(), limits):
                received += len(chunk)
                if received > limits.max_body_bytes:
                    raise _too_large(limits)  # chunked uploads carry no Content-Length: count them
                parser.write(chunk)
            parser.finalize()
        except FormParserError:
            detail = _HEADERS_TOO_LONG + " or are malformed" if collector.in_part_headers else "the body is not valid multipart/form-data"
            raise Problem("invalid-request", detail) from None
        if not collector.complete:
            raise Problem("invalid-request", "the body ended before the closing multipart boundary")
        return _form_from_parts(collector.parts)


async def _paced(chunks: AsyncIterator[bytes], limits: UploadLimits) -> AsyncIterator[bytes]:
    """The body's chunks, cut off with a 408 when the sender goes idle or trickles."""
    started = time.monotonic()
    received = 0
    while True:
        try:
            chunk = await asyncio.wait_for(anext(chunks), limits.idle_timeout_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise Problem("request-timeout", f"the upload sent nothing for {limits.idle_timeout_s:g} s") from None
        received += len(chunk)
        elapsed = time.monotonic() - started
        if elapsed > limits.rate_grace_s and received < limits.min_bytes_per_s * elapsed:
            raise Problem(
                "request-timeout", f"the upload is slower than {limits.min_bytes_per_s:g} bytes/s after {limits.rate_grace_s:g} s"
            )
        yield chunk


def _form_from_parts(parts: dict[str, _Part]) -> AlignForm:
    """Check the fields, then commit the audio last: a refusal here still deletes it."""
    missing = [name for name in ("audio", "text") if name not in parts]
    if missing:
        raise Problem("invalid-request", "missing form field(s): " + ", ".join(missing))
    try:
        text = bytes(parts["text"].data).decode("utf-8")
    except UnicodeDecodeError:
        raise Problem("invalid-transcript", "the transcript is not valid UTF-8") from None

    def short_field(name: str) -> str | None:
        if name not in parts:
            return None
        try:
            return bytes(parts[name].data).decode("ascii").strip()
        except UnicodeDecodeError:
            raise Problem("invalid-request", f"the form field '{name}' must be ASCII") from None

    format_value = short_field("format") or OutputFormat.json.value
    try:
        output_format = OutputFormat(format_value.lower())
    except ValueError:
        raise Problem("invalid-request", "format must be one of: " + ", ".join(f.value for f in OutputFormat)) from None
    language = short_field("language") or None
    audio = parts["audio"]
    return AlignForm(
        audio=audio.sink.commit(),
        audio_filename=audio.filename,
        audio_content_type=audio.content_type,
        text=text,
        language=language,
        format=output_format,
    )
