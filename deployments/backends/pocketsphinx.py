"""The offline English aligner: PocketSphinx forced alignment (model and dictionary ship in its wheel).

Per job: every unit becomes one dictionary word (`english_pronunciation` invents pronunciations for
unknown words and numbers, so "42" aligns as "forty two" and still comes back as one unit), the
float32 audio becomes 16-bit PCM, and a state-alignment search runs over the whole utterance twice:
once on the audio as it is and once on the audio half a 10 ms frame late. The
two passes' frames straddle each other, so:
- a unit's time is the mean of its two passes (a 5 ms grid instead of 10 ms; 0.5 ms better on the
  dev set than one pass);
- its confidence is how well they agree: 1 / (1 + (d / 25 ms)^2), d the passes' start and end
  differences averaged. Where the acoustics pin a boundary down both passes find it; where they do
  not (noise, a vowel running into a vowel, a codec's smearing) the passes drift apart. Calibrated on
  the dev set and its degraded variants (bench/accuracy.py): words under 0.5 have about twice the
  boundary error of the rest.
A very noisy recording (about 10 dB SNR or worse) is aligned on a denoised copy (`denoise`).
A draft job (a long file's locating window, realigned later: `AlignmentJob.draft`) gets the plain
pass only, confidence 0. Then `speech_edges.keep_out_of_silence` takes every word edge out of silence (a first word that
absorbed the leading silence, a last one the trailing silence, either side of a pause).

Search beams: a ladder, per pass. Jobs up to 30 s are searched with the library's own beams first,
longer ones with wide beams (the library's fail outright on some long recordings, see
shared/reference/offline-aligner-and-eval.md); a pass that finds no path moves to the next rung.
A job whose passes still find no path (typically a transcript that does not match the audio) is
retried once with the widest beams, on a decoder built on first need (~27 MB), before it fails.
Unspoken words over near-silence leave no path even then.

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
from deployments.backends.denoise import is_very_noisy, subtract_noise
from deployments.backends.english_pronunciation import NeuralG2P, Pronunciation, UnitPronouncer
from deployments.backends.speech_edges import keep_out_of_silence
from serve_app.text.flags import INTERPOLATED

logger = logging.getLogger("ray.serve")

# Search beams, tried in turn until one finds a path. The library's own suffice for clips and are
# ~10 % faster; the wide ones are needed on long recordings (the library's fail on some, see
# shared/reference/offline-aligner-and-eval.md) and tried first there; the widest are the last
# resort. topn: Gaussians scored per frame and codebook, 3 of the library's 4: 0.2 ms less accurate
# on the dev set (bench/accuracy.py) and 15 % faster. Both help pay for the second pass.
LIBRARY_BEAMS = {"topn": 3}
WIDE_BEAMS = {"beam": 1e-80, "pbeam": 1e-80, "wbeam": 1e-60, "maxhmmpf": -1, "topn": 3}
WIDEST_BEAMS = {"beam": 1e-300, "pbeam": 1e-300, "wbeam": 1e-300, "maxhmmpf": -1, "topn": 3}
LIBRARY_BEAMS_UP_TO_S = 30.0  # the longest job tried on the library's beams first

# The second pass hears the audio half a 10 ms frame late: its frames straddle the first pass's.
SECOND_PASS_DELAY_SAMPLES = 80
# Passes this far apart (ms, start and end averaged) give a unit confidence 0.5. On the dev set and
# its degraded variants, words under 0.5 have ~2x the boundary error of those above (bench/accuracy.py).
HALF_CONFIDENCE_DISAGREEMENT_MS = 25.0

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
    """AlignerBackend over PocketSphinx; jobs run one after another, two passes each."""

    def __init__(self, max_audio_seconds: float = MAX_AUDIO_SECONDS) -> None:
        # One decoder per beam setting; both passes of a job use the same (each resets its features).
        self._library = _AligningDecoder(LIBRARY_BEAMS)
        self._wide = _AligningDecoder(WIDE_BEAMS)
        self._widest: _AligningDecoder | None = None  # built on first need (~27 MB): a rare, slow retry
        # The pronouncer never looks up an invented ("_"-prefixed) word, so this decoder's dictionary
        # answers it as the base dictionary would, rebuilt or not.
        self._pronouncer = UnitPronouncer(self._wide.lookup_word, NeuralG2P())
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
        words = [entry.word for entry in pronunciations]
        heard = subtract_noise(job.audio) if is_very_noisy(job.audio) else job.audio
        passes = self._passes(pronunciations, heard, duration, draft=job.draft)
        if passes is None:
            raise AlignmentFailed(
                "no-alignment-found",
                f"no alignment of {len(job.units)} units to {duration:.1f} s of audio, even with the widest search",
            )
        frame_rate = self._wide.frames_per_second
        plain, late = (None if found is None else _unit_bounds(words, *found, frame_rate) for found in passes)
        return keep_out_of_silence(job.audio, _combined(job.units, plain, late, duration))

    def _passes(
        self, pronunciations: Sequence[Pronunciation], audio: np.ndarray, duration: float, draft: bool
    ) -> tuple[tuple[list[_Segment], float], tuple[list[_Segment], float] | None] | None:
        """(segments, audio offset in s) of the plain pass and of the half-frame-late one (None for
        a draft); None if a pass finds no path even on the widest beams."""
        pcm = _to_pcm16(audio)
        delayed_pcm = None if draft else _to_pcm16(np.concatenate([np.zeros(SECOND_PASS_DELAY_SAMPLES, np.float32), audio]))
        ladder = [self._library, self._wide] if duration <= LIBRARY_BEAMS_UP_TO_S else [self._wide]
        passes = _passes_on(ladder, pronunciations, pcm, delayed_pcm)
        return passes if passes is not None else _passes_on([self._widest_decoder()], pronunciations, pcm, delayed_pcm)

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

    def _widest_decoder(self) -> _AligningDecoder:
        if self._widest is None:
            logger.info("pocketsphinx: building the widest-beam decoder for alignment retries")
            self._widest = _AligningDecoder(WIDEST_BEAMS)
        return self._widest


def _passes_on(
    decoders: Sequence[_AligningDecoder], pronunciations: Sequence[Pronunciation], pcm: bytes, delayed_pcm: bytes | None
) -> tuple[tuple[list[_Segment], float], tuple[list[_Segment], float] | None] | None:
    plain = _first_path(decoders, pronunciations, pcm)
    if plain is None or delayed_pcm is None:
        return None if plain is None else ((plain, 0.0), None)
    late = _first_path(decoders, pronunciations, delayed_pcm)
    return None if late is None else ((plain, 0.0), (late, SECOND_PASS_DELAY_SAMPLES / SAMPLE_RATE))


def _first_path(
    decoders: Sequence[_AligningDecoder], pronunciations: Sequence[Pronunciation], pcm: bytes
) -> list[_Segment] | None:
    """The segments of the first decoder whose search finds a path."""
    for decoder in decoders:
        segments = decoder.align(pronunciations, pcm)
        if segments is not None:
            return segments
    return None


def _to_pcm16(audio: np.ndarray) -> bytes:
    samples = np.clip(np.nan_to_num(audio.astype(np.float32, copy=False)), -1.0, 1.0)
    return np.round(samples * 32767).astype("<i2").tobytes()


def _unit_bounds(
    words: Sequence[str], segments: Sequence[_Segment], offset: float, frame_rate: int
) -> list[tuple[float, float] | None]:
    """(start, end) seconds per word of one pass, taking the segments of the expected words in order.

    Segments of other words (silences, fillers, sentence markers) are skipped. A word whose segment
    never comes (which a successful alignment does not produce) gets None. `offset` is how late the
    pass's audio started (its delay), taken off again.
    """
    bounds: list[tuple[float, float] | None] = []
    next_segment = 0
    for word in words:
        found = next((index for index in range(next_segment, len(segments)) if segments[index].word == word), None)
        if found is None:
            bounds.append(None)
            continue
        segment = segments[found]
        bounds.append((segment.start_frame / frame_rate - offset, (segment.end_frame + 1) / frame_rate - offset))
        next_segment = found + 1
    return bounds


def _combined(
    units: Sequence[str],
    plain: Sequence[tuple[float, float] | None],
    late: Sequence[tuple[float, float] | None] | None,
    duration: float,
) -> list[UnitTiming]:
    """One timing per unit: the two passes' mean, its confidence from how far they disagree.

    With no late pass (a draft) the plain pass's times, confidence 0: nothing confirmed them. A unit
    either pass lost is placed with zero length at the end of the previous unit, confidence 0 and
    flagged interpolated, so the count always matches.
    """

    def clamped(value: float) -> float:
        return min(max(value, 0.0), duration)

    timings: list[UnitTiming] = []
    previous_end = 0.0
    for unit, first, second in zip(units, plain, plain if late is None else late, strict=True):
        if first is None or second is None:
            timings.append(UnitTiming(unit, previous_end, previous_end, 0.0, (INTERPOLATED,)))
            continue
        start = max(clamped((first[0] + second[0]) / 2), previous_end)
        end = max(clamped((first[1] + second[1]) / 2), start)
        disagreement_ms = (abs(first[0] - second[0]) + abs(first[1] - second[1])) / 2 * 1000
        timings.append(UnitTiming(unit, start, end, 0.0 if late is None else _confidence(disagreement_ms)))
        previous_end = end
    return timings


def _confidence(disagreement_ms: float) -> float:
    """1 when both passes agree, 0.5 at HALF_CONFIDENCE_DISAGREEMENT_MS apart, towards 0 beyond."""
    return round(1.0 / (1.0 + (disagreement_ms / HALF_CONFIDENCE_DISAGREEMENT_MS) ** 2), 3)
