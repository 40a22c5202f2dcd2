"""The hand-labelled dev set and the word-boundary metric every accuracy benchmark uses.

The dev set is ../shared/eval/emuR_ae (7 read Australian English utterances, 54 words). The metric
is the one in shared/reference/offline-aligner-and-eval.md: hypothesis words pair with reference
words by position; every paired word gives |start error| and |end error| in ms, pooled over all
boundaries; a reference word with no hypothesis time (a shorter answer, or a failed job) is missing.
`load_eval_set` and `score_alignments` are reusable for any backend.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from deployments.backends.base import SAMPLE_RATE, AlignmentJob, JobOutcome, UnitTiming

EVAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "eval" / "emuR_ae"
THRESHOLDS_MS = (20, 50, 100)


@dataclass(frozen=True)
class ReferenceWord:
    word: str
    start: float  # seconds
    end: float


@dataclass(frozen=True)
class EvalUtterance:
    id: str
    audio: np.ndarray  # float32 mono at SAMPLE_RATE
    words: tuple[ReferenceWord, ...]

    @property
    def duration(self) -> float:
        return self.audio.size / SAMPLE_RATE

    def job(self) -> AlignmentJob:
        # The dev set's words are plain words and contractions: each is exactly one alignment unit.
        return AlignmentJob(self.audio, tuple(word.word for word in self.words), "English")


@dataclass(frozen=True)
class AccuracyReport:
    boundaries: int  # two per paired word
    missing_words: int
    mean_ms: float
    percent_within_ms: dict[int, float]  # threshold (ms) -> % of boundaries within it


def load_eval_set(directory: Path = EVAL_DIR) -> list[EvalUtterance]:
    utterances = json.loads((directory / "reference.json").read_text())["utterances"]
    loaded = []
    for utterance in utterances:
        audio, rate = soundfile.read(directory / utterance["audio"], dtype="float32")
        if rate != SAMPLE_RATE or audio.ndim != 1:
            raise ValueError(f"{utterance['id']}: expected mono {SAMPLE_RATE} Hz audio")
        words = tuple(ReferenceWord(word["word"], word["start"], word["end"]) for word in utterance["words"])
        loaded.append(EvalUtterance(utterance["id"], audio, words))
    return loaded


def score_alignments(
    pairs: Sequence[tuple[Sequence[ReferenceWord], Sequence[UnitTiming] | JobOutcome]],
) -> AccuracyReport:
    """Pool boundary errors over (reference words, backend answer) pairs, words paired by position."""
    errors_ms: list[float] = []
    missing = 0
    for reference, answer in pairs:
        hypothesis = answer if isinstance(answer, list) else []
        for expected, got in zip(reference, hypothesis):
            errors_ms += [abs(got.start - expected.start) * 1000, abs(got.end - expected.end) * 1000]
        missing += max(0, len(reference) - len(hypothesis))
    errors = np.asarray(errors_ms)
    return AccuracyReport(
        boundaries=errors.size,
        missing_words=missing,
        mean_ms=float(errors.mean()) if errors.size else float("nan"),
        percent_within_ms={
            threshold: float((errors <= threshold).mean() * 100) if errors.size else 0.0 for threshold in THRESHOLDS_MS
        },
    )
