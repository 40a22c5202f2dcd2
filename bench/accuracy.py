"""Word-boundary accuracy, confidence and speed of the PocketSphinx backend: the dev set and its
degraded variants (issue 14).

The dev set is ../shared/eval/emuR_ae; the variants are bench.degraded's (noise, babble, telephone
band, low-bitrate codecs, padding, speed), reference times adjusted. The metric is bench.eval_set's
(boundaries paired by position, absolute error in ms). For each variant: the mean, the share within
20/50/100 ms, missing words, and the error of first starts, last ends and interior boundaries apart
(edges are where aligners absorb silence). Confidence is judged on every word of every variant
pooled: the mean error (start and end averaged) of words under 0.5 against those at or above it.
RTF is the backend's wall time over the audio duration for one 3 s clip, one job per call, median
of the repetitions.

    .venv/bin/python -m bench.accuracy [--repetitions 15] [--variant clean --variant mp3-8k]

Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bench.degraded import VARIANTS, degraded_set
from bench.eval_set import EVAL_DIR, EvalUtterance, load_eval_set, score_alignments
from deployments.backends.base import JobOutcome

TARGET_MEAN_MS = 15.0
TARGET_WITHIN_50_MS_PERCENT = 95.0
TARGET_EDGE_OVER_INTERIOR = 1.5  # first starts and last ends, each against interior boundaries
TARGET_DEGRADED_OVER_CLEAN = 1.3
DEGRADED_FIGURES = ("white-10db", "mp3-8k")  # the "10 dB noise" and "8 kHz MP3"
TARGET_CONFIDENCE_SEPARATION = 2.0  # mean error below 0.5 over mean error at or above it
TARGET_RTF = 0.03
RTF_CLIP_SECONDS = 3.0


@dataclass(frozen=True)
class EdgeErrors:
    first_start_ms: float
    last_end_ms: float
    interior_ms: float  # every other boundary


@dataclass(frozen=True)
class WordScore:
    error_ms: float  # |start error| and |end error| averaged
    confidence: float


def edge_errors(utterances: Sequence[EvalUtterance], answers: Sequence[JobOutcome]) -> EdgeErrors:
    first, last, interior = [], [], []
    for utterance, answer in zip(utterances, answers):
        if not isinstance(answer, list):
            continue
        for index, (expected, got) in enumerate(zip(utterance.words, answer)):
            start_error, end_error = abs(got.start - expected.start) * 1000, abs(got.end - expected.end) * 1000
            (first if index == 0 else interior).append(start_error)
            (last if index == len(utterance.words) - 1 else interior).append(end_error)
    return EdgeErrors(float(np.mean(first)), float(np.mean(last)), float(np.mean(interior)))


def word_scores(utterances: Sequence[EvalUtterance], answers: Sequence[JobOutcome]) -> list[WordScore]:
    return [
        WordScore((abs(got.start - expected.start) + abs(got.end - expected.end)) / 2 * 1000, got.confidence)
        for utterance, answer in zip(utterances, answers)
        if isinstance(answer, list)
        for expected, got in zip(utterance.words, answer)
    ]


def _rtf(backend, utterances: Sequence[EvalUtterance], repetitions: int) -> tuple[float, float]:
    """(RTF, clip seconds) for the dev clip closest to RTF_CLIP_SECONDS."""
    clip = min(utterances, key=lambda utterance: abs(utterance.duration - RTF_CLIP_SECONDS))
    backend.align_batch([clip.job()])  # warm: invented words learned, caches filled
    seconds = []
    for _ in range(repetitions):
        started = time.perf_counter()
        backend.align_batch([clip.job()])
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds) / clip.duration, clip.duration


def _verdict(met: bool) -> str:
    return "PASS" if met else "FAIL"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=15, help="timed calls on the 3 s clip (RTF is their median)")
    parser.add_argument("--variant", action="append", choices=["clean", *VARIANTS], help="only these (repeatable)")
    args = parser.parse_args()

    from deployments.backends.pocketsphinx import PocketSphinxBackend

    started = time.perf_counter()
    backend = PocketSphinxBackend()
    init_seconds = time.perf_counter() - started
    clean = load_eval_set()
    variants = args.variant or ["clean", *VARIANTS]
    words = sum(len(utterance.words) for utterance in clean)
    print(f"backend: {backend.info.model}; backend init {init_seconds:.2f} s")
    print(f"dev set: {EVAL_DIR.name}, {len(clean)} utterances, {words} words; variants: bench.degraded")
    print()
    print(f"{'variant':<14} {'mean ms':>8} {'<=20':>6} {'<=50':>6} {'<=100':>6} {'missing':>7} "
          f"{'first':>6} {'last':>6} {'inside':>6}")  # fmt: skip

    means: dict[str, float] = {}
    edges: dict[str, EdgeErrors] = {}
    within_50: dict[str, float] = {}
    missing: dict[str, int] = {}
    scores: list[WordScore] = []
    for variant in variants:
        utterances = degraded_set(variant, clean)
        answers = [backend.align_batch([utterance.job()])[0] for utterance in utterances]
        report = score_alignments([(utterance.words, answer) for utterance, answer in zip(utterances, answers)])
        edges[variant] = edge_errors(utterances, answers)
        means[variant], within_50[variant], missing[variant] = report.mean_ms, report.percent_within_ms[50], report.missing_words
        scores += word_scores(utterances, answers)
        within = report.percent_within_ms
        print(f"{variant:<14} {report.mean_ms:8.1f} {within[20]:5.1f}% {within[50]:5.1f}% {within[100]:5.1f}% "
              f"{report.missing_words:7d} {edges[variant].first_start_ms:6.1f} {edges[variant].last_end_ms:6.1f} "
              f"{edges[variant].interior_ms:6.1f}")  # fmt: skip
    print()

    checks: dict[str, bool] = {}
    if "clean" in means:
        edge = edges["clean"]
        checks[f"clean mean <= {TARGET_MEAN_MS:g} ms"] = means["clean"] <= TARGET_MEAN_MS
        checks[f"clean within 50 ms >= {TARGET_WITHIN_50_MS_PERCENT:g} %"] = within_50["clean"] >= TARGET_WITHIN_50_MS_PERCENT
        checks["clean missing words == 0"] = missing["clean"] == 0
        print(f"clean: mean {means['clean']:.1f} ms, within 50 ms {within_50['clean']:.1f} %, missing {missing['clean']}")
        for name, value in (("first start", edge.first_start_ms), ("last end", edge.last_end_ms)):
            ratio = value / edge.interior_ms
            checks[f"clean {name} <= {TARGET_EDGE_OVER_INTERIOR:g}x interior"] = ratio <= TARGET_EDGE_OVER_INTERIOR
            print(f"clean {name}: {value:.1f} ms = {ratio:.2f}x the interior {edge.interior_ms:.1f} ms")
        for variant in DEGRADED_FIGURES:
            if variant in means:
                ratio = means[variant] / means["clean"]
                checks[f"{variant} <= {TARGET_DEGRADED_OVER_CLEAN:g}x clean"] = ratio <= TARGET_DEGRADED_OVER_CLEAN
                print(f"{variant}: {means[variant]:.1f} ms = {ratio:.2f}x clean")

    low = [score.error_ms for score in scores if score.confidence < 0.5]
    high = [score.error_ms for score in scores if score.confidence >= 0.5]
    if low and high:
        separation = statistics.mean(low) / statistics.mean(high)
        checks[f"confidence separation >= {TARGET_CONFIDENCE_SEPARATION:g}x"] = separation >= TARGET_CONFIDENCE_SEPARATION
        print(f"confidence < 0.5: {len(low)} words, mean error {statistics.mean(low):.1f} ms; "
              f">= 0.5: {len(high)} words, {statistics.mean(high):.1f} ms; ratio {separation:.2f}")  # fmt: skip
    else:
        checks["confidence separation (words on both sides of 0.5)"] = False
        print(f"confidence: {len(low)} words under 0.5, {len(high)} at or above: no separation to measure")

    rtf, clip_seconds = _rtf(backend, clean, max(1, args.repetitions))
    checks[f"RTF <= {TARGET_RTF:g}"] = rtf <= TARGET_RTF
    print(f"RTF on a {clip_seconds:.1f} s clip: {rtf:.4f} (median of {args.repetitions}, one job per call, one thread)")
    print()
    for name, met in checks.items():
        print(f"{_verdict(met)}  {name}")
    print(f"overall: {_verdict(all(checks.values()))}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
