"""Long labelled recordings built from the dev set, for measuring alignment of long audio.

The dev set's utterances (../shared/eval/emuR_ae, see bench.accuracy) are concatenated in shuffled
passes through the set, so every utterance recurs evenly and no utterance follows itself, with a
pause drawn uniformly from 0.2-2.0 s between two utterances, until the target duration is reached:
the result is at least the target and at most one utterance and one pause longer. A pause is
low-level Gaussian noise (-60 dBFS RMS) rather than digital zeros, as a real room never gives
exact silence. Every reference word keeps its hand-labelled times, offset by its utterance's start.

Everything is whole samples of 16-bit PCM: the dev clips are 16-bit, so the signal that
`samples` returns and the WAV that `write_wav` streams are the same numbers, and an utterance in
the recording is bit-identical to its source clip. A plan is cheap (orders and pause lengths only);
the signal is produced piece by piece, so writing a 2 h WAV never holds it whole in memory.

    .venv/bin/python -m bench.long_audio --minutes 30 --out /tmp/long.wav [--seed 0]

writes the WAV and, next to it, a JSON (/tmp/long.json) with the transcript and the reference words.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from bench.eval_set import EvalUtterance, ReferenceWord, load_eval_set
from deployments.backends.base import SAMPLE_RATE

PAUSE_SECONDS = (0.2, 2.0)
PAUSE_NOISE_DBFS = -60.0  # RMS level of the noise filling a pause, relative to full scale
_PCM_SCALE = 32768  # soundfile reads 16-bit PCM as int / 32768


@dataclass(frozen=True)
class RecordingPlan:
    """Which utterance comes when: utterance `order[i]`, then pause i, then utterance `order[i + 1]`..."""

    source: tuple[EvalUtterance, ...]
    order: tuple[int, ...]  # indices into source, one per utterance in the recording
    pause_samples: tuple[int, ...]  # one fewer than order
    seed: int  # also seeds the pauses' noise

    def utterance_starts(self) -> tuple[int, ...]:
        """Each utterance's first sample in the recording."""
        starts, position = [], 0
        for index, utterance_index in enumerate(self.order):
            starts.append(position)
            position += self.source[utterance_index].audio.size
            if index < len(self.pause_samples):
                position += self.pause_samples[index]
        return tuple(starts)

    @property
    def total_samples(self) -> int:
        return sum(self.source[index].audio.size for index in self.order) + sum(self.pause_samples)

    def recording(self) -> LongRecording:
        """The recording's labels (no audio is produced)."""
        words: list[ReferenceWord] = []
        spans: list[tuple[float, float]] = []
        for start_sample, utterance_index in zip(self.utterance_starts(), self.order):
            utterance = self.source[utterance_index]
            offset = start_sample / SAMPLE_RATE
            words += [ReferenceWord(word.word, word.start + offset, word.end + offset) for word in utterance.words]
            spans.append((offset, offset + utterance.duration))
        return LongRecording(tuple(words), self.total_samples / SAMPLE_RATE, len(self.order), tuple(spans))


@dataclass(frozen=True)
class LongRecording:
    words: tuple[ReferenceWord, ...]  # reference times in the long recording, seconds
    duration: float  # seconds
    utterance_count: int
    utterance_spans: tuple[tuple[float, float], ...]  # (start, end) of each utterance's clip, seconds

    @property
    def transcript(self) -> str:
        return " ".join(word.word for word in self.words)


def plan_recording(
    target_seconds: float,
    seed: int = 0,
    pauses: tuple[float, float] = PAUSE_SECONDS,
    source: Sequence[EvalUtterance] | None = None,
) -> RecordingPlan:
    """Utterances in shuffled passes, with uniform pauses between them, until `target_seconds` is reached."""
    utterances = tuple(load_eval_set() if source is None else source)
    if len(utterances) < 2:
        raise ValueError("need at least two utterances, so that no utterance follows itself")
    if target_seconds <= 0:
        raise ValueError("the target duration must be positive")
    low, high = pauses
    if not 0 <= low <= high:
        raise ValueError("pauses must be a (shortest, longest) pair of non-negative seconds")
    rng = np.random.default_rng(seed)
    target = round(target_seconds * SAMPLE_RATE)
    order: list[int] = []
    pause_samples: list[int] = []
    total = 0
    while True:
        passage = [int(index) for index in rng.permutation(len(utterances))]
        if order and passage[0] == order[-1]:
            # The pass would start with the utterance that ended the previous one: move it one on.
            passage[0], passage[1] = passage[1], passage[0]
        for index in passage:
            if order:
                pause = round(rng.uniform(low, high) * SAMPLE_RATE)
                pause_samples.append(pause)
                total += pause
            order.append(index)
            total += utterances[index].audio.size
            if total >= target:
                return RecordingPlan(utterances, tuple(order), tuple(pause_samples), seed)


def _pieces(plan: RecordingPlan) -> Iterator[np.ndarray]:
    """The recording as int16 pieces, utterance, pause, utterance..., in order."""
    noise_rms = _PCM_SCALE * 10 ** (PAUSE_NOISE_DBFS / 20)
    for index, utterance_index in enumerate(plan.order):
        yield np.round(plan.source[utterance_index].audio * _PCM_SCALE).astype(np.int16)
        if index < len(plan.pause_samples):
            # A generator per pause, so each pause's noise depends on the seed and its place only.
            rng = np.random.default_rng((plan.seed, index))
            noise = rng.normal(0.0, noise_rms, plan.pause_samples[index])
            yield np.clip(np.round(noise), -32768, 32767).astype(np.int16)


def samples(plan: RecordingPlan) -> np.ndarray:
    """The whole signal, float32 in [-1, 1) (for short recordings: it is all in memory)."""
    return (np.concatenate(list(_pieces(plan))) / _PCM_SCALE).astype(np.float32)


def write_wav(plan: RecordingPlan, path: Path | str) -> LongRecording:
    """Stream the recording to a 16-bit mono WAV at SAMPLE_RATE, one utterance or pause at a time."""
    with soundfile.SoundFile(path, "w", samplerate=SAMPLE_RATE, channels=1, subtype="PCM_16", format="WAV") as out:
        for piece in _pieces(plan):
            out.write(piece)
    return plan.recording()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, required=True, help="target duration")
    parser.add_argument("--out", type=Path, required=True, help="the WAV to write; its JSON goes beside it")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    plan = plan_recording(args.minutes * 60, seed=args.seed)
    recording = write_wav(plan, args.out)
    labels = {
        "audio": args.out.name,
        "seed": args.seed,
        "duration": recording.duration,
        "utterances": [plan.source[index].id for index in plan.order],
        "transcript": recording.transcript,
        "words": [{"word": word.word, "start": word.start, "end": word.end} for word in recording.words],
    }
    args.out.with_suffix(".json").write_text(json.dumps(labels, indent=1) + "\n")
    print(
        f"{args.out}: {recording.duration:.1f} s, {recording.utterance_count} utterances, "
        f"{len(recording.words)} words (labels in {args.out.with_suffix('.json')})"
    )


if __name__ == "__main__":
    main()
