"""The offline English aligner: PocketSphinx forced alignment (model and dictionary ship in its wheel).

Per job: every unit becomes one dictionary word (`english_pronunciation` invents pronunciations for
unknown words and numbers, so "42" aligns as "forty two" and still comes back as one unit), the
float32 audio becomes 16-bit PCM, a state-alignment search runs over the whole utterance and its
word segments become one `UnitTiming` per unit, in order, in seconds within [0, duration].

Search beams: the wide ones below for every job. On the dev set they give the same timings as the
library defaults for ~10 % more time, and the defaults fail outright on some long recordings (see
shared/reference/offline-aligner-and-eval.md). A job whose search still finds no path (typically a
transcript that does not match the audio) is retried once with the widest beams, on a second
decoder built on first need (~27 MB), before it fails. Unspoken words over near-silence leave no
path even then.

Failure behaviour: a job that cannot be aligned comes back as `AlignmentFailed` with reason
`unsupported-language`, `audio-too-long`, `unpronounceable-unit` (no Latin letter or digit in a
unit) or `no-alignment-found` (the transcript cannot be fitted to the audio, e.g. far too many words
for its length); details carry counts and positions, never transcript text. Any other exception
is our failure on that job alone: it comes back as `BackendFailed` and the batch's other jobs are
still aligned.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import version

import numpy as np
from pocketsphinx import Decoder

from deployments.backends.base import (
    SAMPLE_RATE,
    AlignmentFailed,
    AlignmentJob,
    BackendFailed,
    BackendInfo,
    JobOutcome,
    UnitTiming,
)
from deployments.backends.english_pronunciation import NeuralG2P, Pronunciation, UnitPronouncer

logger = logging.getLogger("ray.serve")

WIDE_BEAMS = {"beam": 1e-80, "pbeam": 1e-80, "wbeam": 1e-60, "maxhmmpf": -1}
WIDEST_BEAMS = {"beam": 1e-300, "pbeam": 1e-300, "wbeam": 1e-300, "maxhmmpf": -1}

# The longest job: cost per audio second is flat up to ~90 s and grows past it (1.8x at 300 s,
# bench/window_cost.py); longer audio is aligned in windows (serve_app.pipeline.windows).
MAX_AUDIO_SECONDS = 90.0

# Invented words stay in a decoder's dictionary; once their phones (alternates included) pass this
# many the decoder is rebuilt (~0.1 s), so a stream of unique unknown words cannot grow it without
# bound. A made-up word has ~7 phones, a number's readings together ~30-60.
MAX_INVENTED_PHONES = 100_000

_ALTERNATE_SUFFIX = re.compile(r"\(\d+\)$")  # "friends(2)": the second pronunciation was chosen


@dataclass(frozen=True)
class _Segment:
    word: str  # dictionary word, alternate-pronunciation suffix removed
    start_frame: int
    end_frame: int  # inclusive


class _AligningDecoder:
    """One PocketSphinx decoder in alignment mode, at fixed beams, with a bounded invented vocabulary."""

    def __init__(self, beams: dict[str, float]) -> None:
        self._beams = beams
        self._decoder = self._build()
        self._invented: set[str] = set()
        self._invented_phones = 0
        self.frames_per_second: int = self._decoder.config["frate"]

    def _build(self) -> Decoder:
        # lm=None: no language model, the search follows the given word sequence only.
        return Decoder(lm=None, bestpath=False, loglevel="FATAL", **self._beams)

    def lookup_word(self, word: str) -> str | None:
        return self._decoder.lookup_word(word)

    def align(self, pronunciations: Sequence[Pronunciation], pcm: bytes) -> list[_Segment] | None:
        """Word segments (fillers and silences included) for the whole utterance; None if no path."""
        self._learn([entry for entry in pronunciations if entry.new_phones])
        self._decoder.set_align_text(" ".join(entry.word for entry in pronunciations))
        # The decoder carries its noise estimate and cepstral mean over from the last utterance:
        # reset both, so an answer depends on its own audio only, never on what this replica
        # aligned before (a job's result equals the same request's /v1/align answer).
        self._decoder.reinit_feat()
        self._decoder.start_utt()
        self._decoder.process_raw(pcm, full_utt=True)
        self._decoder.end_utt()
        if self._decoder.hyp() is None:
            return None
        return [
            _Segment(_ALTERNATE_SUFFIX.sub("", segment.word), segment.start_frame, segment.end_frame)
            for segment in self._decoder.seg()
        ]

    def _learn(self, invented: Sequence[Pronunciation]) -> None:
        unknown = {entry.word: entry for entry in invented if entry.word not in self._invented}
        if self._invented_phones + _phone_count(unknown.values()) > MAX_INVENTED_PHONES:
            self._decoder = self._build()
            self._invented.clear()
            self._invented_phones = 0
            unknown = {entry.word: entry for entry in invented}
        for word, entry in unknown.items():
            for index, phones in enumerate(entry.new_phones):
                self._decoder.add_word(word if index == 0 else f"{word}({index + 1})", phones)
            self._invented.add(word)
        self._invented_phones += _phone_count(unknown.values())


def _phone_count(entries: Iterable[Pronunciation]) -> int:
    return sum(len(phones.split()) for entry in entries for phones in entry.new_phones)


class PocketSphinxBackend:
    """AlignerBackend over PocketSphinx; jobs run one after another on one decoder."""

    def __init__(self, max_audio_seconds: float = MAX_AUDIO_SECONDS) -> None:
        self._decoder = _AligningDecoder(WIDE_BEAMS)
        self._widest_decoder: _AligningDecoder | None = None
        # The pronouncer never looks up an invented ("_"-prefixed) word, so this decoder's dictionary
        # answers it as the base dictionary would, rebuilt or not.
        self._pronouncer = UnitPronouncer(self._decoder.lookup_word, NeuralG2P())
        self.info = BackendInfo(
            name="pocketsphinx",
            model=f"cmusphinx en-us (pocketsphinx {version('pocketsphinx')})",
            languages=frozenset({"English"}),
            max_audio_seconds=max_audio_seconds,
        )

    def align_batch(self, jobs: Sequence[AlignmentJob]) -> list[JobOutcome]:
        results: list[JobOutcome] = []
        for job in jobs:
            try:
                results.append(self._align(job))
            except AlignmentFailed as failure:
                results.append(failure)
            except Exception as error:  # a bug or a resource failure on this job: it alone fails
                logger.warning("pocketsphinx failed on one job: %s", type(error).__name__)
                results.append(BackendFailed.from_error(error))
        return results

    def _align(self, job: AlignmentJob) -> list[UnitTiming]:
        if job.language not in self.info.languages:
            raise AlignmentFailed("unsupported-language", "the PocketSphinx backend aligns English only")
        duration = job.audio.size / SAMPLE_RATE
        if duration > self.info.max_audio_seconds:
            raise AlignmentFailed(
                "audio-too-long", f"{duration:.1f} s exceeds this backend's {self.info.max_audio_seconds:.0f} s"
            )
        if job.audio.size == 0:
            raise AlignmentFailed("no-alignment-found", "the audio is empty")
        pronunciations = self._pronounce(job.units)
        pcm = _to_pcm16(job.audio)
        segments = self._decoder.align(pronunciations, pcm)
        decoder = self._decoder
        if segments is None:
            decoder = self._widest()
            segments = decoder.align(pronunciations, pcm)
        if segments is None:
            raise AlignmentFailed(
                "no-alignment-found",
                f"no alignment of {len(job.units)} units to {duration:.1f} s of audio, even with the widest search",
            )
        words = [entry.word for entry in pronunciations]
        return _unit_timings(job.units, words, segments, decoder.frames_per_second, duration)

    def _pronounce(self, units: Sequence[str]) -> list[Pronunciation]:
        pronunciations = []
        for position, unit in enumerate(units):
            pronunciation = self._pronouncer.pronounce(unit)
            if pronunciation is None:
                raise AlignmentFailed(
                    "unpronounceable-unit", f"unit {position + 1} of {len(units)} has no Latin letter or digit"
                )
            pronunciations.append(pronunciation)
        return pronunciations

    def _widest(self) -> _AligningDecoder:
        if self._widest_decoder is None:
            logger.info("pocketsphinx: building the widest-beam decoder for alignment retries")
            self._widest_decoder = _AligningDecoder(WIDEST_BEAMS)
        return self._widest_decoder


def _to_pcm16(audio: np.ndarray) -> bytes:
    samples = np.clip(np.nan_to_num(audio.astype(np.float32, copy=False)), -1.0, 1.0)
    return np.round(samples * 32767).astype("<i2").tobytes()


def _unit_timings(
    units: Sequence[str], words: Sequence[str], segments: Sequence[_Segment], frame_rate: int, duration: float
) -> list[UnitTiming]:
    """One timing per unit, taking the segments of the expected words in order.

    Segments of other words (silences, fillers, sentence markers) are skipped. A unit whose word
    never comes (which a successful alignment does not produce) gets a zero-length time at the end
    of the previous unit, so the count always matches.
    """

    def seconds(frame: int) -> float:
        return min(max(frame / frame_rate, 0.0), duration)

    timings: list[UnitTiming] = []
    next_segment = 0
    previous_end = 0.0
    for unit, word in zip(units, words, strict=True):
        found = next((index for index in range(next_segment, len(segments)) if segments[index].word == word), None)
        if found is None:
            timings.append(UnitTiming(unit, previous_end, previous_end))
            continue
        segment = segments[found]
        start = seconds(segment.start_frame)
        end = max(start, seconds(segment.end_frame + 1))
        timings.append(UnitTiming(unit, start, end))
        previous_end = end
        next_segment = found + 1
    return timings
