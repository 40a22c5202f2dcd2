"""Spectral subtraction before PocketSphinx for very noisy recordings (deployments.backends.denoise)."""

from __future__ import annotations

import numpy as np

from deployments.backends.base import SAMPLE_RATE
from deployments.backends.denoise import is_very_noisy, subtract_noise


def speech_in_noise(snr_db: float, seed: int = 0) -> tuple[np.ndarray, slice]:
    """A 1 s 300 Hz + 1.2 kHz 'vowel' between 1 s noise-only stretches, at `snr_db`."""
    rng = np.random.default_rng(seed)
    time = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    vowel = 0.3 * np.sin(2 * np.pi * 300 * time) + 0.2 * np.sin(2 * np.pi * 1200 * time)
    clean = np.concatenate([np.zeros(SAMPLE_RATE), vowel, np.zeros(SAMPLE_RATE)])
    noise = rng.standard_normal(clean.size) * np.sqrt(np.mean(vowel**2) / 10 ** (snr_db / 10))
    return (clean + noise).astype(np.float32), slice(SAMPLE_RATE, 2 * SAMPLE_RATE)


def power_db(audio: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(audio.astype(np.float64) ** 2)))


def test_only_recordings_about_10_db_snr_or_worse_count_as_very_noisy():
    assert is_very_noisy(speech_in_noise(5)[0])
    assert is_very_noisy(speech_in_noise(10)[0])
    assert not is_very_noisy(speech_in_noise(30)[0])
    assert not is_very_noisy(np.zeros(SAMPLE_RATE, np.float32))  # digital silence: nothing to judge


def test_the_noise_goes_down_a_lot_and_the_speech_hardly_at_all():
    noisy, speech = speech_in_noise(5)
    cleaned = subtract_noise(noisy)
    assert cleaned.shape == noisy.shape and cleaned.dtype == np.float32
    noise_only = slice(SAMPLE_RATE // 4, 3 * SAMPLE_RATE // 4)
    assert power_db(cleaned[noise_only]) < power_db(noisy[noise_only]) - 3  # the gain floor allows -14 dB at most
    assert abs(power_db(cleaned[speech]) - power_db(noisy[speech])) < 2


def test_the_timeline_is_kept_to_the_sample():
    noisy, _ = speech_in_noise(5)
    click = 40_000
    noisy[click] += 5.0
    cleaned = subtract_noise(noisy)
    assert int(np.argmax(np.abs(cleaned))) == click
