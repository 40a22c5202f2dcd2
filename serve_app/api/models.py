"""Request and response models of API v1, in one place (they also shape the OpenAPI document)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.media.spool import SpooledFile
from serve_app.problems import PROBLEM_MEDIA_TYPE
from serve_app.text.flags import FLAGS
from serve_app.text.formats import OutputFormat
from serve_app.text.languages import accepted_values


class AlignForm(BaseModel):
    """The multipart fields of POST /v1/align, after streaming and size checks."""

    audio: SpooledFile = Field(repr=False)  # the upload in the spool: the receiver removes it
    audio_filename: str | None = None  # declared by the client: logged, never trusted
    audio_content_type: str | None = None  # declared by the client: logged, never trusted
    text: str = Field(repr=False)
    language: str | None = None
    format: OutputFormat = OutputFormat.json


# The OpenAPI description of the multipart body. The ingress parses the body itself (to enforce byte
# caps while it streams), so FastAPI cannot derive this from handler parameters.
ALIGN_REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["audio", "text"],
                "properties": {
                    "audio": {
                        "type": "string",
                        "format": "binary",
                        "description": "The audio file: WAV, FLAC, MP3, Ogg (Vorbis/Opus), M4A/MP4 or WebM.",
                    },
                    "text": {"type": "string", "minLength": 1, "description": "The transcript, UTF-8."},
                    "language": {
                        "type": "string",
                        "description": "Name or ISO code; default English. One of: " + "; ".join(accepted_values()),
                    },
                    "format": {"type": "string", "enum": [member.value for member in OutputFormat], "default": "json"},
                },
            },
            "encoding": {"audio": {"contentType": "application/octet-stream, audio/*, video/*"}},
        }
    },
}


class WordOut(BaseModel):
    text: str = Field(description="The word exactly as given in the transcript.")
    start: float = Field(ge=0, description="Seconds from the start of the audio.")
    end: float = Field(ge=0, description="Seconds from the start of the audio; >= start.")
    confidence: float | None = Field(
        ge=0,
        le=1,
        description=(
            "How far the aligner trusts this word's start and end, 0..1. Calibrated on hand-labelled "
            "speech and its degraded variants: words under 0.5 have about twice the boundary error of "
            "the others. 0 for an interpolated word. null only in the result of a job that finished "
            "before the service reported confidence."
        ),
    )
    flags: list[Literal[FLAGS]] = Field(  # type: ignore[valid-type]  (the tuple spreads into the Literal)
        description=(
            "What to know about this word's time, usually empty. interpolated: not measured, placed "
            "between its neighbours (the aligner gave it no usable time). repaired: the aligner's first "
            "answer was implausible (Qwen3's zero-length words, shared start times, words piled up at the "
            "end) and this time comes from re-aligning a smaller stretch of audio."
        ),
    )


class AlignResponse(BaseModel):
    id: str = Field(description="Request id (also in the X-Request-Id header).")
    language: str
    duration: float = Field(description="Decoded audio duration in seconds.")
    backend: str = Field(description="The aligner backend that served the request: qwen3 or pocketsphinx.")
    model: str
    words: list[WordOut]


class Problem(BaseModel):
    """RFC 9457 problem details (application/problem+json)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None


def problem_responses(*statuses: int) -> dict:
    """OpenAPI `responses` entries for error statuses answered with a problem document."""
    return {status: {"model": Problem, "content": {PROBLEM_MEDIA_TYPE: {}}} for status in statuses}


class Health(BaseModel):
    status: Literal["ok"]


class DependencyStatus(BaseModel):
    status: Literal["ready", "unavailable"]
    detail: str | None = None


class Readiness(BaseModel):
    """What a load balancer needs: nothing about which dependency failed (that is admin-only)."""

    status: Literal["ready", "unavailable"]
    jobs: Literal["ready", "unavailable"] = Field(
        description="Whether a job runner is taking jobs from the queue (POST /v1/align does not need one)."
    )


class DependencyReport(BaseModel):
    status: Literal["ready", "unavailable"]
    backend: str | None = Field(None, description="The aligner backend actually loaded.")
    model: str | None = None
    checks: dict[str, DependencyStatus] = Field(
        description="scanner, clamd (through the scanner), aligner, redis; jobs (the job runner and queue: not part of `status`)."
    )
    age_s: float = Field(0.0, description="Seconds since the background probe that produced this report.")


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no "1" for 1, no false for 0

    owner: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    scopes: list[Literal["align", "admin"]] = Field(min_length=1)
    plan: str = Field("standard", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    expires_in_days: float | None = Field(None, gt=0, le=3650)


class KeyRotate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    overlap_hours: float = Field(24, ge=0, le=24 * 90, description="How long the old key keeps working.")


class KeyOut(BaseModel):
    key_id: str
    owner: str
    scopes: list[str]
    plan: str
    state: Literal["active", "expired", "revoked"]
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None
    replaced_by: str | None


class KeyCreated(BaseModel):
    key: str = Field(description="The API key. Shown once: store it now.")
    record: KeyOut


class BanOut(BaseModel):
    subject: str
    reason: str
    offence: int
    retry_after_s: int


class JobProgress(BaseModel):
    windows_done: int = Field(description="Aligner jobs (windows) done.")
    windows_total: int = Field(description="Windows the file takes: an estimate while running (cuts follow the speech), exact at the end.")
    audio_seconds_done: float = Field(description="Audio located so far, from the start of the file.")
    audio_seconds_total: float = Field(description="The decoded duration (what was charged).")


class JobLinks(BaseModel):
    self: str
    result: str = Field(description="GET it once status is succeeded; ?format=json|srt|vtt|textgrid.")


class JobOut(BaseModel):
    id: str = Field(description="Unguessable (128 random bits).")
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: float = Field(description="Unix time (seconds).")
    started_at: float | None
    finished_at: float | None
    expires_at: float | None = Field(description="When an ended job and its result are deleted (then 404).")
    language: str
    format: OutputFormat = Field(description="The submitted format: the default of the result link.")
    duration: float = Field(description="Decoded audio seconds (charged once, at submission).")
    progress: JobProgress
    error: Problem | None = Field(description="The RFC 9457 problem a failed job ended with.")
    links: JobLinks


class JobList(BaseModel):
    jobs: list[JobOut] = Field(description="Newest first.")
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last one.")
