"""Read the multipart body of POST /v1/align while it streams, with hard caps.

Why not `request.form()`: Starlette spools files to disk with no total cap and silently decodes
invalid UTF-8 as Latin-1. Here the body is counted as it arrives (Content-Length *and* chunked
uploads), refused with 413 the moment it passes `max_body_bytes`, each text field is capped on its
own, only the four known fields are accepted (each once, audio once), and the transcript must be
valid UTF-8. Everything stays in memory: the cap bounds it, and the scanner needs the bytes anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from serve_app.api.formats import OutputFormat
from serve_app.api.models import AlignForm
from serve_app.api.problems import Problem

_FIELDS = ("audio", "text", "language", "format")
_MAX_SHORT_FIELD_BYTES = 64  # language and format values are short codes


@dataclass(frozen=True)
class UploadLimits:
    max_body_bytes: int
    max_text_bytes: int


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    content_type: str | None = None
    data: bytearray = field(default_factory=bytearray)


class _FormCollector:
    """python-multipart callbacks that collect the known fields and enforce per-field caps."""

    def __init__(self, limits: UploadLimits):
        self._limits = limits
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._part = _Part()
        self.parts: dict[str, _Part] = {}

    def on_part_begin(self) -> None:
        self._part = _Part()
        self._headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_name.strip().lower()] = self._header_value.strip()
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
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
        self.parts[name] = self._part

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._part.data += data[start:end]
        if self._part.name != "audio" and len(self._part.data) > self._field_cap(self._part.name):
            slug = "transcript-too-long" if self._part.name == "text" else "invalid-request"
            raise Problem(slug, f"the form field '{self._part.name}' exceeds {self._field_cap(self._part.name)} bytes")

    def _field_cap(self, name: str) -> int:
        return self._limits.max_text_bytes if name == "text" else _MAX_SHORT_FIELD_BYTES

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
        }


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


async def read_align_form(request: Request, limits: UploadLimits) -> AlignForm:
    declared_length = request.headers.get("content-length")
    if declared_length is not None:
        if not declared_length.isdigit():
            raise Problem("invalid-request", "the Content-Length header is not a number")
        if int(declared_length) > limits.max_body_bytes:
            raise _too_large(limits)  # refused before reading a byte of the body

    collector = _FormCollector(limits)
    parser = MultipartParser(_boundary(request), collector.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limits.max_body_bytes:
                raise _too_large(limits)  # chunked uploads carry no Content-Length: count them
            parser.write(chunk)
        parser.finalize()
    except FormParserError:
        raise Problem("invalid-request", "the body is not valid multipart/form-data") from None
    return _form_from_parts(collector.parts)


def _form_from_parts(parts: dict[str, _Part]) -> AlignForm:
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
    audio = parts["audio"]
    return AlignForm(
        audio=bytes(audio.data),
        audio_filename=audio.filename,
        audio_content_type=audio.content_type,
        text=text,
        language=short_field("language") or None,
        format=output_format,
    )
