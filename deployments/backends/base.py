"""The one interface every aligner backend implements.

A backend turns decoded audio plus a sequence of alignment *units* (normalised words, or single CJK
characters) into a start/end time per unit. It knows nothing of HTTP, of Serve or of the caller's
original spelling: the ingress maps unit timings back to the caller's words
(`serve_app.text.timing`).

Failure policy: every job gets its own outcome, and a backend tells the two kinds of failure apart.
`AlignmentFailed`: this input cannot be aligned (the caller's problem, a 422). `BackendFailed`: we
failed on it (an exception, out of memory; a 503 when a retry may succeed, else a 500). A backend
never lets one job's exception fail the other jobs of its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, Union

import numpy as np

SAMPLE_RATE = 16_000  # every backend receives mono float32 at this rate, decoded by the scanner


@dataclass(frozen=True)
class SharedPcm:
    """Decoded int16 PCM in Ray's object store: the scanner put it there, once, for the aligner.

    The ingress passes only this reference on (decoded audio crosses one hop, scanner -> aligner);
    the Aligner deployment reads it into float32 before batching, so backends only ever see arrays.
    """

    ref: tuple  # (ray.ObjectRef,): in a tuple, so Serve hands the reference on instead of resolving it early
    sample_count: int


@dataclass(frozen=True)
class AlignmentJob:
    """One request's worth of work for a backend."""

    # float32, mono, SAMPLE_RATE, values in [-1, 1]; a SharedPcm only on its way to the Aligner deployment
    audio: np.ndarray | SharedPcm
    units: tuple[str, ...]  # normalised alignment units, in spoken order; never empty
    language: str  # canonical language name, one of serve_app.text.languages.LANGUAGES
    # A draft only locates the text in a long file; a later job aligns it again. A backend may skip
    # what only sharpens times (PocketSphinx: its second pass; the units' confidence is then 0).
    draft: bool = False


@dataclass(frozen=True)
class UnitTiming:
    """A backend's time for one unit, in seconds from the start of the audio.

    `confidence` (0..1) is how far the backend trusts this unit's boundaries: calibrated so that
    units under 0.5 have clearly larger boundary errors than those above (bench/accuracy.py).
    `flags` come from serve_app.text.flags.FLAGS.
    """

    text: str
    start: float
    end: float
    confidence: float
    flags: tuple[str, ...] = ()


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
class BackendFailed:
    """The backend failed on one job: our failure, not the input's (the ingress answers 5xx).

    Only the exception's class travels: messages can quote input and never reach logs or clients.
    """

    error_type: str  # the exception's class name, for logs and metrics
    transient: bool  # out of memory: a retry (in a smaller batch, later) may succeed -> 503, else 500

    @classmethod
    def from_error(cls, error: BaseException) -> "BackendFailed":
        # torch.OutOfMemoryError (CUDA) by name, so this module never imports torch.
        transient = isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
        return cls(type(error).__name__, transient)


JobOutcome = Union[list[UnitTiming], AlignmentFailed, BackendFailed]


@dataclass(frozen=True)
class BackendInfo:
    """What the ingress and /v1/ready need to know about the loaded backend."""

    name: str  # "qwen3" | "pocketsphinx"
    model: str  # the model id or path it was loaded from (no secrets)
    languages: frozenset[str]  # canonical language names it can align
    max_audio_seconds: float  # longest audio it aligns reliably in one job


class AlignerBackend(Protocol):
    info: BackendInfo

    def align_batch(self, jobs: Sequence[AlignmentJob]) -> list[JobOutcome]:
        """Align every job; one entry per job, in order: its unit timings or why it failed.

        Blocking (CPU/GPU bound): the Aligner deployment calls it off the event loop.
        """
        ...
