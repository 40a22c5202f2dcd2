"""Degraded variants of the dev set, with reference times adjusted: the robustness set (issue 14).

Each variant turns one dev utterance (16 kHz float32 audio and its hand-labelled words) into what a
real upload often is, and moves the reference times along where the audio's timeline changes:

- `white-20db`, `white-10db`: white noise at 20 / 10 dB SNR;
- `babble-20db`, `babble-10db`: the other utterances of the set summed (a crowd of one speaker's
  voices, which is what the set has), at 20 / 10 dB SNR;
- `telephone-8k`: band-limited to 300-3400 Hz and resampled to 8 kHz and back;
- `mp3-8k`: 8 kHz MP3 at 16 kbit/s (libmp3lame), decoded back to 16 kHz;
- `opus-12k`: Opus at 12 kbit/s (libopus), decoded back to 16 kHz;
- `padded-3s`: 3 s of digital silence added before and after (times + 3 s);
- `speed-0.9`, `speed-1.1`: played 10 % slower / faster by resampling (times / speed).

SNR is speech power over noise power, speech power measured between the first word's start and the
last word's end (the set's recordings carry 0.3 s of silence at each end, which would otherwise
dilute it). Noise is seeded per utterance and variant, so every run scores the same audio.
Encoding and resampling use the FFmpeg (PyAV) that the service decodes uploads with.

    .venv/bin/python -m bench.degraded --out var/degraded   # writes <variant>/<id>.wav + reference.json
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import av
import numpy as np
import soundfile

from bench.eval_set import EvalUtterance, ReferenceWord, load_eval_set
from deployments.backends.base import SAMPLE_RATE

Degrade = Callable[[EvalUtterance, Sequence[EvalUtterance]], EvalUtterance]


def _speech_power(utterance: EvalUtterance) -> float:
    first = int(utterance.words[0].start * SAMPLE_RATE)
    last = int(utterance.words[-1].end * SAMPLE_RATE)
    speech = utterance.audio[first:last].astype(np.float64)
    return float(np.mean(speech**2))


def _rng(utterance: EvalUtterance, variant: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{utterance.id}/{variant}".encode()))


def _with_noise(utterance: EvalUtterance, noise: np.ndarray, snr_db: float) -> EvalUtterance:
    noise = noise.astype(np.float64)
    scale = np.sqrt(_speech_power(utterance) / (np.mean(noise**2) * 10 ** (snr_db / 10)))
    mixed = utterance.audio + scale * noise
    peak = np.max(np.abs(mixed))
    mixed = mixed / peak * 0.95 if peak > 0.95 else mixed  # never clip: scale the whole mix down
    return dataclasses.replace(utterance, audio=mixed.astype(np.float32))


def white_noise(snr_db: float) -> Degrade:
    def degrade(utterance: EvalUtterance, others: Sequence[EvalUtterance]) -> EvalUtterance:
        noise = _rng(utterance, f"white-{snr_db}").standard_normal(utterance.audio.size)
        return _with_noise(utterance, noise, snr_db)

    return degrade


def babble(snr_db: float) -> Degrade:
    def degrade(utterance: EvalUtterance, others: Sequence[EvalUtterance]) -> EvalUtterance:
        rng = _rng(utterance, f"babble-{snr_db}")
        crowd = np.zeros(utterance.audio.size, np.float64)
        for other in others:
            if other.id == utterance.id:
                continue
            voice = np.resize(other.audio, utterance.audio.size + other.audio.size)  # looped
            offset = int(rng.integers(0, other.audio.size))
            voice = voice[offset : offset + utterance.audio.size].astype(np.float64)
            crowd += voice / np.sqrt(np.mean(voice**2) + 1e-12)  # each talker at the same level
        return _with_noise(utterance, crowd, snr_db)

    return degrade


def _resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """FFmpeg's resampler (libswresample), as the service's decoder uses it."""
    frame = av.AudioFrame.from_ndarray(audio.astype(np.float32)[None, :], format="flt", layout="mono")
    frame.sample_rate = from_rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=to_rate)
    chunks = [out.to_ndarray()[0] for out in resampler.resample(frame)]
    chunks += [out.to_ndarray()[0] for out in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.float32)


def _fitted(audio: np.ndarray, size: int) -> np.ndarray:
    """Trim or zero-pad to `size` samples: a codec's priming and padding must not move the timeline."""
    return np.pad(audio[:size], (0, max(0, size - audio.size)))


def telephone(utterance: EvalUtterance, others: Sequence[EvalUtterance]) -> EvalUtterance:
    spectrum = np.fft.rfft(utterance.audio.astype(np.float64))
    frequencies = np.fft.rfftfreq(utterance.audio.size, 1 / SAMPLE_RATE)
    spectrum[(frequencies < 300) | (frequencies > 3400)] = 0
    band = np.fft.irfft(spectrum, utterance.audio.size).astype(np.float32)
    narrow = _resample(band, SAMPLE_RATE, 8000)
    return dataclasses.replace(utterance, audio=_fitted(_resample(narrow, 8000, SAMPLE_RATE), utterance.audio.size))


def _codec_round_trip(audio: np.ndarray, container: str, codec: str, rate: int, bit_rate: int) -> np.ndarray:
    source = _resample(audio, SAMPLE_RATE, rate) if rate != SAMPLE_RATE else audio
    encoded = io.BytesIO()
    with av.open(encoded, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=rate, layout="mono")
        stream.bit_rate = bit_rate
        sample_format = stream.codec_context.format.name
        frame_size = stream.codec_context.frame_size or 1024
        samples = source.astype(np.float32)
        for start in range(0, samples.size, frame_size):
            piece = samples[start : start + frame_size]
            frame = av.AudioFrame.from_ndarray(piece[None, :], format="flt", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            for converted in av.AudioResampler(format=sample_format, layout="mono", rate=rate).resample(frame):
                output.mux(stream.encode(converted))
        output.mux(stream.encode(None))
    encoded.seek(0)
    decoded: list[np.ndarray] = []
    with av.open(encoded, mode="r", format=container) as source_file:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        for frame in source_file.decode(audio=0):
            decoded += [out.to_ndarray()[0] for out in resampler.resample(frame)]
        decoded += [out.to_ndarray()[0] for out in resampler.resample(None)]
    return _fitted(np.concatenate(decoded).astype(np.float32), audio.size)


def mp3_8k(utterance: EvalUtterance, others: Sequence[EvalUtterance]) -> EvalUtterance:
    audio = _codec_round_trip(utterance.audio, "mp3", "libmp3lame", 8000, 16_000)
    return dataclasses.replace(utterance, audio=audio)


def opus_12k(utterance: EvalUtterance, others: Sequence[EvalUtterance]) -> EvalUtterance:
    audio = _codec_round_trip(utterance.audio, "ogg", "libopus", 48_000, 12_000)
    return dataclasses.replace(utterance, audio=audio)


def _shifted(words: Sequence[ReferenceWord], offset: float = 0.0, scale: float = 1.0) -> tuple[ReferenceWord, ...]:
    return tuple(ReferenceWord(word.word, word.start * scale + offset, word.end * scale + offset) for word in words)


def padded(seconds: float) -> Degrade:
    def degrade(utterance: EvalUtterance, others: Sequence[EvalUtterance]) -> EvalUtterance:
        silence = np.zeros(round(seconds * SAMPLE_RATE), np.float32)
        audio = np.concatenate([silence, utterance.audio, silence])
        return dataclasses.replace(utterance, audio=audio, words=_shifted(utterance.words, offset=seconds))

    return degrade


def speed(factor: float) -> Degrade:
    def degrade(utterance: EvalUtterance, others: Sequence[EvalUtterance]) -> EvalUtterance:
        # Samples played at factor x the rate: resample from SAMPLE_RATE * factor to SAMPLE_RATE.
        audio = _resample(utterance.audio, round(SAMPLE_RATE * factor), SAMPLE_RATE)
        return dataclasses.replace(utterance, audio=audio, words=_shifted(utterance.words, scale=1 / factor))

    return degrade


VARIANTS: dict[str, Degrade] = {
    "white-20db": white_noise(20),
    "white-10db": white_noise(10),
    "babble-20db": babble(20),
    "babble-10db": babble(10),
    "telephone-8k": telephone,
    "mp3-8k": mp3_8k,
    "opus-12k": opus_12k,
    "padded-3s": padded(3.0),
    "speed-0.9": speed(0.9),
    "speed-1.1": speed(1.1),
}


def degraded_set(variant: str, utterances: Sequence[EvalUtterance]) -> list[EvalUtterance]:
    """Every utterance of the set, degraded as `variant` says ("clean" leaves them as they are)."""
    if variant == "clean":
        return list(utterances)
    degrade = VARIANTS[variant]
    return [degrade(utterance, utterances) for utterance in utterances]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write the variants into")
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="only these (repeatable)")
    args = parser.parse_args()
    utterances = load_eval_set()
    for variant in args.variant or list(VARIANTS):
        folder = args.out / variant
        folder.mkdir(parents=True, exist_ok=True)
        entries = []
        for utterance in degraded_set(variant, utterances):
            soundfile.write(folder / f"{utterance.id}.wav", utterance.audio, SAMPLE_RATE, subtype="PCM_16")
            words = [{"word": word.word, "start": round(word.start, 6), "end": round(word.end, 6)} for word in utterance.words]
            entries.append({"id": utterance.id, "audio": f"{utterance.id}.wav", "words": words})
        (folder / "reference.json").write_text(json.dumps({"set": f"emuR_ae/{variant}", "utterances": entries}, indent=1))
        print(f"{folder}: {len(entries)} utterances")


if __name__ == "__main__":
    main()
