"""PocketSphinx on windows of a long recording: cost and accuracy by window length, and how much of
a window's tail goes wrong when its text span is only estimated.

A long labelled recording (bench.long_audio, written to a temporary WAV and read back one window
at a time) is cut at pause midpoints into consecutive windows of about each length; each window is
aligned on its own with the words that lie inside it. Per length: RTF (wall and CPU seconds per
audio second of one `align_batch` call, one thread; the median over the windows) and accuracy
(bench.accuracy's metric, pooled over the windows). The baseline is the dev clips one by one.

Text-span experiment, on windows of the --span-lengths: the same windows aligned with K words too
many (the first K words of the next window appended) or K too few (the window's last K words left
out). Errors are grouped by the word's place counted back from the last of the window's words that
the text holds; a word has "moved" when its timing is more than 20 ms from where the exact text put
it, and the deepest moved word says how much of the text's tail is not to be trusted. A window whose
alignment fails outright counts as failed and is left out of the errors. The same windows are also
aligned with a text that starts K words late or early: whether a window can start anywhere but at a
known boundary.

    .venv/bin/python -m bench.window_cost [--lengths 20 40 ...] [--windows 5] [--span-lengths 60 120]

Prints Markdown tables. Nothing is asserted: the numbers inform the long-audio windowing design.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import soundfile

from bench.eval_set import THRESHOLDS_MS, AccuracyReport, ReferenceWord, load_eval_set, score_alignments
from bench.long_audio import LongRecording, RecordingPlan, plan_recording, write_wav
from deployments.backends.base import SAMPLE_RATE, AlignmentJob, JobOutcome, UnitTiming
from deployments.backends.pocketsphinx import PocketSphinxBackend

MOVED_MS = 20  # a word whose timing changed by more than this when the text span was off has moved
PLACE_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 40)  # places counted back from the text's last word, lower bounds


@dataclass(frozen=True)
class Window:
    start: float  # seconds in the long recording
    end: float
    words: tuple[ReferenceWord, ...]  # those inside, times relative to the window's start
    following: tuple[str, ...]  # the words after the window, in order (for over-long text spans)

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Timed:
    answer: JobOutcome
    wall_seconds: float
    cpu_seconds: float


def cut_points(plan: RecordingPlan) -> list[int]:
    """Sample positions where a window may start or end: the recording's ends and every pause's midpoint."""
    points = [0]
    for start, index, pause in zip(plan.utterance_starts(), plan.order, plan.pause_samples):
        points.append(start + plan.source[index].audio.size + pause // 2)
    return points + [plan.total_samples]


def windows_of(plan: RecordingPlan, recording: LongRecording, length: float, count: int) -> list[Window]:
    """`count` consecutive windows from the recording's start, each ending at the cut nearest `length` on."""
    points = cut_points(plan)
    windows: list[Window] = []
    start = 0
    while len(windows) < count:
        later = [point for point in points if point > start]
        if not later:
            raise ValueError(f"the recording is too short for {count} windows of {length:.0f} s")
        end = min(later, key=lambda point: abs(point - start - length * SAMPLE_RATE))
        begin_s, end_s = start / SAMPLE_RATE, end / SAMPLE_RATE
        inside = [word for word in recording.words if begin_s <= word.start and word.end <= end_s]
        after = tuple(word.word for word in recording.words if word.start >= end_s)
        shifted = tuple(ReferenceWord(word.word, word.start - begin_s, word.end - begin_s) for word in inside)
        windows.append(Window(begin_s, end_s, shifted, after))
        start = end
    return windows


def align_timed(backend: PocketSphinxBackend, audio, units: Sequence[str]) -> Timed:
    wall, cpu = time.perf_counter(), time.process_time()
    answer = backend.align_batch([AlignmentJob(audio, tuple(units), "English")])[0]
    return Timed(answer, time.perf_counter() - wall, time.process_time() - cpu)


def read_window(path: Path, window: Window):
    audio, _ = soundfile.read(
        path, start=round(window.start * SAMPLE_RATE), stop=round(window.end * SAMPLE_RATE), dtype="float32"
    )
    return audio


def accuracy_cells(report: AccuracyReport) -> str:
    within = " | ".join(f"{report.percent_within_ms[threshold]:.1f}" for threshold in THRESHOLDS_MS)
    return f"{report.mean_ms:.1f} | {within} | {report.missing_words}"


def baseline(backend: PocketSphinxBackend, repetitions: int = 3) -> None:
    utterances = load_eval_set()
    seconds = sum(utterance.duration for utterance in utterances)
    walls, cpus, answers = [], [], []
    for _ in range(repetitions):
        timed = [align_timed(backend, utterance.audio, utterance.job().units) for utterance in utterances]
        walls.append(sum(item.wall_seconds for item in timed) / seconds)
        cpus.append(sum(item.cpu_seconds for item in timed) / seconds)
        answers = [item.answer for item in timed]
    report = score_alignments([(utterance.words, answer) for utterance, answer in zip(utterances, answers)])
    mean_length = seconds / len(utterances)
    print(
        f"| one by one (dev clips, {mean_length:.1f} s) | {len(utterances)} | {statistics.median(walls):.4f} | "
        f"{statistics.median(cpus):.4f} | {accuracy_cells(report)} | 0 |"
    )


def cost_row(backend, path: Path, label: str, windows: Sequence[Window]) -> None:
    timed = [align_timed(backend, read_window(path, window), [w.word for w in window.words]) for window in windows]
    report = score_alignments([(window.words, item.answer) for window, item in zip(windows, timed)])
    wall = statistics.median(item.wall_seconds / window.duration for window, item in zip(windows, timed))
    cpu = statistics.median(item.cpu_seconds / window.duration for window, item in zip(windows, timed))
    failed = sum(not isinstance(item.answer, list) for item in timed)
    print(f"| {label} | {len(windows)} | {wall:.4f} | {cpu:.4f} | {accuracy_cells(report)} | {failed} |", flush=True)


def cost_by_length(backend, path: Path, plan, recording, lengths: Sequence[float], count: int) -> None:
    within = " | ".join(f"% <= {threshold} ms" for threshold in THRESHOLDS_MS)
    print("\n### Exact text: cost and accuracy by window length\n")
    print(f"| window | windows | RTF wall (median) | RTF CPU (median) | mean error ms | {within} | missing | failed |")
    print("|---|---|---|---|---|" + "---|" * len(THRESHOLDS_MS) + "---|---|")
    baseline(backend)
    # Length 0 ends every window at the next cut: one utterance each, with the recording's pause noise.
    singles = windows_of(plan, recording, 0, 10 * len(plan.source))
    cost_row(backend, path, f"one by one (from the recording, {statistics.mean(w.duration for w in singles):.1f} s)", singles)
    for length in lengths:
        windows = windows_of(plan, recording, length, count)
        cost_row(backend, path, f"{statistics.mean(window.duration for window in windows):.1f} s", windows)


def _bucket(value: float, bounds: Sequence[float]) -> int:
    return max(index for index, bound in enumerate(bounds) if value >= bound)


def _labels(bounds: Sequence[int], unit: str) -> list[str]:
    labels = []
    for index, bound in enumerate(bounds):
        upper = bounds[index + 1] - 1 if index + 1 < len(bounds) else None
        labels.append(f">= {bound}{unit}" if upper is None else f"{bound}{unit}" if upper == bound else f"{bound}-{upper}{unit}")
    return labels


def _moved(exact: UnitTiming, got: UnitTiming) -> bool:
    """Whether a word's timing differs from its exact-text timing by more than MOVED_MS at either boundary."""
    pair = ((ReferenceWord(exact.text, exact.start, exact.end),), [got])
    return score_alignments([pair]).percent_within_ms[MOVED_MS] < 100.0


def tail_errors(backend, path: Path, plan, recording, length: float, count: int, ks: Sequence[int]) -> None:
    """Windows aligned with their exact words, K words too many and K too few; errors by place in the text."""
    windows = windows_of(plan, recording, length, count)
    audio = {window: read_window(path, window) for window in windows}
    conditions = [("exact", 0)] + [(f"+{k} words", k) for k in ks] + [(f"-{k} words", -k) for k in ks]
    mean_length = statistics.mean(window.duration for window in windows)
    print(f"\n### Text span off by K words, windows of {mean_length:.1f} s ({len(windows)} windows)\n")
    print(
        "Cells: mean boundary error ms / % of boundaries within 50 ms against the hand labels, by the word's "
        "place counted back from the last of the window's words that the text holds (0 = that word). "
        f"Moved: a word more than {MOVED_MS} ms from where the exact text put it; deepest = the farthest back "
        "any moved word lay, in words and in seconds (reference ends) before that last word, over the aligned windows.\n"
    )
    print(f"| text | {' | '.join(_labels(PLACE_BUCKETS, ''))} | moved words | deepest moved (words / s) | failed windows | RTF wall |")
    print("|---|" + "---|" * len(PLACE_BUCKETS) + "---|---|---|---|")
    exact_answers: dict[Window, JobOutcome] = {}
    for label, k in conditions:
        scored: list[tuple[int, tuple]] = []  # (place from the end, (reference, answer)) per aligned word
        moved: list[tuple[int, float]] = []  # (place, seconds) before the last given word, per moved word
        failed, rtfs = 0, []
        for window in windows:
            words = [word.word for word in window.words]
            given = len(words) if k >= 0 else len(words) + k  # the window's words in the text
            units = words[:given] + list(window.following[:k] if k > 0 else ())
            timed = align_timed(backend, audio[window], units)
            rtfs.append(timed.wall_seconds / window.duration)
            if k == 0:
                exact_answers[window] = timed.answer
            if not isinstance(timed.answer, list):
                failed += 1
                continue
            exact = exact_answers[window]
            last_end = window.words[given - 1].end
            for position in range(given):
                got, place = timed.answer[position], given - 1 - position
                scored.append((place, ((window.words[position],), [got])))
                if isinstance(exact, list) and _moved(exact[position], got):
                    moved.append((place, last_end - window.words[position].end))
        cells = []
        for index in range(len(PLACE_BUCKETS)):
            report = score_alignments([pair for place, pair in scored if _bucket(place, PLACE_BUCKETS) == index])
            cells.append(f"{report.mean_ms:.0f} / {report.percent_within_ms[50]:.0f}" if report.boundaries else "-")
        deepest = f"{max(p for p, _ in moved)} / {max(s for _, s in moved):.1f}" if moved else "none"
        print(
            f"| {label} | {' | '.join(cells)} | {len(moved)} of {len(scored)} | {deepest} | {failed} of {len(windows)} "
            f"| {statistics.median(rtfs):.4f} |",
            flush=True,
        )


def head_errors(backend, path: Path, plan, recording, length: float, count: int, ks: Sequence[int]) -> None:
    """Windows whose text starts K words late (their first K words left out) or K words early (the
    previous window's last K words put first): what such a start does to the rest of the window."""
    windows = windows_of(plan, recording, length, count)
    audio = {window: read_window(path, window) for window in windows}
    print(f"\n### Text start off by K words, windows of {statistics.mean(w.duration for w in windows):.1f} s\n")
    print(f"Moved: more than {MOVED_MS} ms from where the exact text put the word; counted over the window's own words aligned.\n")
    print("| text | mean error of the window's words | moved words | failed windows |")
    print("|---|---|---|---|")
    exact = {window: align_timed(backend, audio[window], [word.word for word in window.words]).answer for window in windows}
    for label, k in [(f"starts {k} words late", k) for k in ks] + [(f"starts {k} words early", -k) for k in ks]:
        pairs, moved, total, failed = [], 0, 0, 0
        for index, window in enumerate(windows[1:] if k < 0 else windows, start=1 if k < 0 else 0):
            own = list(window.words[k:] if k > 0 else window.words)
            extra = [word.word for word in windows[index - 1].words[k:]] if k < 0 else []
            answer = align_timed(backend, audio[window], extra + [word.word for word in own]).answer
            if not isinstance(answer, list) or not isinstance(exact[window], list):
                failed += 1
                continue
            got = answer[len(extra) :]
            pairs.append((own, got))
            reference = exact[window][k:] if k > 0 else exact[window]
            moved += sum(_moved(before, after) for before, after in zip(reference, got))
            total += len(own)
        report = score_alignments(pairs)
        print(f"| {label} | {report.mean_ms:.0f} ms | {moved} of {total} | {failed} of {len(windows)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=float, nargs="*", default=[20, 40, 60, 90, 120, 180, 300])
    parser.add_argument("--windows", type=int, default=5, help="windows per length")
    parser.add_argument("--span-lengths", type=float, nargs="*", default=[60, 120])
    parser.add_argument("--extra", type=int, nargs="*", default=[5, 15, 30], help="the K of the text-span runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    longest = max([*args.lengths, *args.span_lengths], default=0)
    # Room for the windows of the longest length plus the next window's words for the K-extra runs,
    # and for the single-utterance windows (ten passes through the set, ~4.2 s an utterance and pause).
    plan = plan_recording(max(longest * (args.windows + 1) + 60, 600), seed=args.seed)
    backend = PocketSphinxBackend()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "long.wav"
        recording = write_wav(plan, path)
        print(
            f"recording: {recording.duration:.0f} s, {recording.utterance_count} utterances, "
            f"{len(recording.words)} words (seed {args.seed}); backend: {backend.info.model}"
        )
        warm_up = windows_of(plan, recording, 10, 1)[0]
        align_timed(backend, read_window(path, warm_up), [word.word for word in warm_up.words])
        if args.lengths:
            cost_by_length(backend, path, plan, recording, args.lengths, args.windows)
        for length in args.span_lengths:
            head_errors(backend, path, plan, recording, length, args.windows, args.extra)
            tail_errors(backend, path, plan, recording, length, args.windows, args.extra)


if __name__ == "__main__":
    main()
