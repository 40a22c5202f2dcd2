"""The one interface every aligner backend implements.

A backend turns decoded audio plus a sequence of alignment *units* (normalised words, or single CJK
characters) into a start/end time per unit. It knows nothing of HTTP, of Serve or of the caller's
original spelling: the ingress maps unit timings back to the caller's words
(`serve_app.text.timing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

SAMPLE_RATE = 16_000  # every backend receives mono float32 at this rate, decoded by the scanner


@dataclass(frozen=True)
class AlignmentJob:
    """One request's worth of work for a backend."""

    audio: np.ndarray  # float32, mono, SAMPLE_RATE, values in [-1, 1]
    units: tuple[str, ...]  # normalised alignment units, in spoken order; never empty
    language: str  # canonical language name, one of serve_app.api.languages.LANGUAGES


@dataclass(frozen=True)
class UnitTiming:
    """A backend's time for one unit, in seconds from the start of the audio."""

    text: str
    start: float
    end: float


class AlignmentFailed(Exception):
    """A backend could not align one job (not a crash of the backend itself).

    `reason` is a short stable code (e.g. "no-alignment-found"); it becomes a 422 problem at the
    ingress. Never put transcript text or audio in it.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)  # both in args, so it survives pickling across replicas
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class BackendInfo:
    """What the ingress and /v1/ready need to know about the loaded backend."""

    name: str  # "qwen3" | "pocketsphinx"
    model: str  # the model id or path it was loaded from (no secrets)
    languages: frozenset[str]  # canonical language names it can align
    max_audio_seconds: float  # longest audio it aligns reliably in one job


class AlignerBackend(Protocol):
    info: BackendInfo

    def align_batch(self, jobs: Sequence[AlignmentJob]) -> list[list[UnitTiming] | AlignmentFailed]:
        """Align every job; one entry per job, in order: its unit timings or why it failed.

        Blocking (CPU/GPU bound): the Aligner deployment calls it off the event loop.
        """
        ...
