"""An alignment's words as the response body of the requested format: json, srt, vtt, textgrid.

POST /v1/align and GET /v1/jobs/{id}/result answer the same documents through this one function.
"""

from __future__ import annotations

from fastapi import Response
from fastapi.responses import JSONResponse, PlainTextResponse

from serve_app.api.models import AlignResponse, WordOut
from serve_app.text import formats
from serve_app.text.formats import OutputFormat
from serve_app.text.timing import WordTiming


def render_alignment(
    output: OutputFormat, *, id: str, language: str, duration: float, backend: str, model: str, words: list[WordTiming]
) -> Response:
    duration = round(duration, 3)
    if output is OutputFormat.srt:
        return PlainTextResponse(formats.to_srt(words), media_type=formats.MEDIA_TYPES[output])
    if output is OutputFormat.vtt:
        return PlainTextResponse(formats.to_vtt(words), media_type=formats.MEDIA_TYPES[output])
    if output is OutputFormat.textgrid:
        return PlainTextResponse(formats.to_textgrid(words, duration), media_type=formats.MEDIA_TYPES[output])
    body = AlignResponse(
        id=id,
        language=language,
        duration=duration,
        backend=backend,
        model=model,
        words=[
            WordOut(text=word.text, start=word.start, end=word.end, confidence=word.confidence, flags=list(word.flags))
            for word in words
        ],
    )
    return JSONResponse(body.model_dump())
