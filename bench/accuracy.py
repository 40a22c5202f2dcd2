"""Word-boundary accuracy and speed of the PocketSphinx backend on the hand-labelled dev set.

The dev set is ../shared/eval/emuR_ae (7 read Australian English utterances, 54 words). The metric
is the one in shared/reference/offline-aligner-and-eval.md: hypothesis words pair with reference
words by position; every paired word gives |start error| and |end error| in ms, pooled over all
boundaries; a reference word with no hypothesis time (a shorter answer, or a failed job) is missing.
`load_eval_set` and `score_alignments` are reusable for any backend.

Targets: mean boundary error <= 25 ms, >= 90 % of boundaries within 50 ms, 0 missing words.
RTF is the backend's wall time over the audio duration, one job per call, on this machine.

    .venv/bin/python -m bench.accuracy [--repetitions 3]

Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from deployments.backends.base import SAMPLE_RATE, AlignmentJob, JobOutcome, UnitTiming

EVAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "eval" / "emuR_ae"
THRESHOLDS_MS = (20, 50, 100)
TARGET_MEAN_MS = 25.0
TARGET_WITHIN_50_MS_PERCENT = 90.0
TARGET_MISSING_WORDS = 0


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


def _row(label: str, value: str, target: str = "", met: bool | None = None) -> None:
    verdict = "" if met is None else "PASS" if met else "FAIL"
    print(f"{label:<20} {value:>9}   {target:<17} {verdict}".rstrip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=3, help="timed passes over the set (RTF is their median)")
    args = parser.parse_args()

    from deployments.backends.pocketsphinx import PocketSphinxBackend

    started = time.perf_counter()
    backend = PocketSphinxBackend()
    init_seconds = time.perf_counter() - started
    utterances = load_eval_set()
    audio_seconds = sum(utterance.duration for utterance in utterances)

    pass_seconds: list[float] = []
    answers: list[JobOutcome] = []
    for _ in range(max(1, args.repetitions)):
        started = time.perf_counter()
        answers = [backend.align_batch([utterance.job()])[0] for utterance in utterances]
        pass_seconds.append(time.perf_counter() - started)
    report = score_alignments([(utterance.words, answer) for utterance, answer in zip(utterances, answers)])
    failed_jobs = sum(not isinstance(answer, list) for answer in answers)
    rtf = statistics.median(pass_seconds) / audio_seconds

    checks = {
        "mean": report.mean_ms <= TARGET_MEAN_MS,
        "within 50": report.percent_within_ms[50] >= TARGET_WITHIN_50_MS_PERCENT,
        "missing": report.missing_words <= TARGET_MISSING_WORDS,
    }
    words = sum(len(utterance.words) for utterance in utterances)
    print(f"backend: {backend.info.model}; backend init {init_seconds:.2f} s")
    print(f"dev set: {EVAL_DIR.name}, {len(utterances)} utterances, {words} words, {audio_seconds:.1f} s of audio")
    _row("mean boundary error", f"{report.mean_ms:.1f} ms", f"<= {TARGET_MEAN_MS:.0f} ms", checks["mean"])
    for threshold, percent in report.percent_within_ms.items():
        target = f">= {TARGET_WITHIN_50_MS_PERCENT:.0f} %" if threshold == 50 else ""
        _row(f"within {threshold} ms", f"{percent:.1f} %", target, checks["within 50"] if threshold == 50 else None)
    _row("boundaries scored", str(report.boundaries))
    _row("missing words", str(report.missing_words), f"{TARGET_MISSING_WORDS}", checks["missing"])
    _row("failed jobs", str(failed_jobs))
    _row("RTF", f"{rtf:.4f}", f"median of {len(pass_seconds)}")
    print(f"overall: {'PASS' if all(checks.values()) else 'FAIL'} (one job per call, one thread)")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
