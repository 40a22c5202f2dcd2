"""What the service answers, as typed values (mirroring API v1's JSON documents).

Each `from_json` reads the fields it knows and ignores the rest, so a newer service that adds a
field does not break an older client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROBLEM_TYPE_BASE = "urn:forced-aligner:problem:"
ENDED = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class Problem:
    """An RFC 9457 problem document: why a request (or a job) failed."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None

    @property
    def slug(self) -> str:
        """The service's short name for the cause (`audio-too-long`), or the whole `type` URI."""
        return self.type.removeprefix(PROBLEM_TYPE_BASE)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> "Problem":
        return cls(
            type=str(body.get("type", "about:blank")),
            title=str(body.get("title", "")),
            status=int(body.get("status", 0)),
            detail=str(body.get("detail", "")),
            instance=body.get("instance"),
        )


@dataclass(frozen=True)
class Word:
    text: str
    start: float
    end: float
    confidence: float | None = None  # 0..1; None from a server (or a stored job result) without it
    flags: tuple[str, ...] = ()  # "interpolated", "repaired": see the service's README

    @classmethod
    def from_json(cls, word: dict[str, Any]) -> "Word":
        confidence = word.get("confidence")
        return cls(
            word["text"],
            float(word["start"]),
            float(word["end"]),
            None if confidence is None else float(confidence),
            tuple(str(flag) for flag in word.get("flags", ())),
        )

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "start": self.start, "end": self.end, "confidence": self.confidence, "flags": list(self.flags)}


@dataclass(frozen=True)
class Alignment:
    """When each word of the transcript is spoken (format json)."""

    id: str
    language: str
    duration: float
    backend: str
    model: str
    words: tuple[Word, ...]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> "Alignment":
        return cls(
            id=body["id"],
            language=body["language"],
            duration=float(body["duration"]),
            backend=body["backend"],
            model=body["model"],
            words=tuple(Word.from_json(word) for word in body["words"]),
        )

    def to_json(self) -> dict[str, Any]:
        """The document the service sent (format json)."""
        return {
            "id": self.id, "language": self.language, "duration": self.duration, "backend": self.backend, "model": self.model,
            "words": [word.to_json() for word in self.words],
        }  # fmt: skip


@dataclass(frozen=True)
class Progress:
    windows_done: int
    windows_total: int
    audio_seconds_done: float
    audio_seconds_total: float

    @property
    def fraction(self) -> float:
        """0..1, by audio located so far."""
        if self.audio_seconds_total <= 0:
            return 0.0
        return min(self.audio_seconds_done / self.audio_seconds_total, 1.0)


@dataclass(frozen=True)
class JobInfo:
    """A job's state as last read from the service."""

    id: str
    status: str  # queued, running, succeeded, failed, cancelled
    created_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None
    language: str
    format: str
    duration: float
    progress: Progress
    error: Problem | None

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> "JobInfo":
        progress = body["progress"]
        return cls(
            id=body["id"],
            status=body["status"],
            created_at=float(body["created_at"]),
            started_at=body.get("started_at"),
            finished_at=body.get("finished_at"),
            expires_at=body.get("expires_at"),
            language=body["language"],
            format=body["format"],
            duration=float(body["duration"]),
            progress=Progress(
                windows_done=int(progress["windows_done"]),
                windows_total=int(progress["windows_total"]),
                audio_seconds_done=float(progress["audio_seconds_done"]),
                audio_seconds_total=float(progress["audio_seconds_total"]),
            ),
            error=Problem.from_json(body["error"]) if body.get("error") else None,
        )


@dataclass(frozen=True)
class JobPage:
    jobs: tuple[JobInfo, ...]
    next_cursor: str | None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> "JobPage":
        return cls(tuple(JobInfo.from_json(job) for job in body["jobs"]), body.get("next_cursor"))
