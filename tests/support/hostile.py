"""The hostile-input corpus of issue 4: uploads built in memory, each with the answer it must get.

Every case is generated at run time (no binary fixture is committed, and the EICAR string is
assembled by tools.local_services so no file here is itself a detection). `HOSTILE_CASES` pairs each
upload with the problem slug and HTTP status that the scanner and the ingress must produce
(serve_app.media.inspect: clamd -> sniff (libmagic) -> decode with the default caps). `expected_slug` None means the scanner accepts the upload (status 200 once the
transcript aligns); those cases use a 1 s tone, so an HTTP test must supply a transcript the
backend can place on it or expect an alignment problem instead.

Policy on polyglots (the lead's decision): a WAV with a ZIP appended is ACCEPTED when its audio
decodes and clamd finds nothing, because clamd scans the whole upload, appended bytes included
(clamd unpacks the ZIP: the same file with EICAR inside the ZIP is refused as malware), and the
decoder only ever reads the audio stream; the appended bytes never reach a backend or the client.

clamd runs first, so EICAR on its own (plain text to libmagic) is still refused as malware.

The Ogg-with-video case carries VP8: PyAV's wheel has a Theora decoder but no Theora encoder, and
VP8 in Ogg takes the same path (libmagic still says audio/ogg because the audio stream comes first,
so the decoder's one-audio-stream rule is what refuses it).
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from serve_app.media import DecodeLimits, DecodedAudio, Spool
from serve_app.media.clamav import ClamdScanner
from serve_app.media.inspect import Rejection, ScanUnavailable, inspect_upload
from tests.support.audio import encode, png_image, silence_flac, tone, with_cover_art
from tools.local_services import MARKER, eicar

MALWARE_DETECTED = "malware-detected"
ACCEPTED_STATUS = 200
_RATE = 16_000
_SEED = 4  # fixed, so a failing random-byte case reproduces


def scanner_outcome(upload: bytes, clamd: ClamdScanner, limits: DecodeLimits, spool: Spool) -> str | None:
    """The scanner's verdict as a problem slug, or None when it accepts the upload; the upload goes
    through `spool` as the ingress spools it, and neither it nor its PCM is left there."""
    with spool.writer("upload") as writer:
        writer.write(upload)
        spooled = writer.commit()
    try:
        verdict = inspect_upload(spooled, clamd, limits, spool)
    finally:
        spool.remove(spooled)
    if isinstance(verdict, DecodedAudio):
        spool.remove(verdict.pcm_path)
    if isinstance(verdict, ScanUnavailable):
        raise AssertionError(f"clamd gave no verdict ({verdict.reason})")
    return verdict.reason if isinstance(verdict, Rejection) else None


@dataclass(frozen=True)
class HostileCase:
    name: str
    build: Callable[[], bytes]
    expected_slug: str | None  # None: accepted by the scanner
    expected_status: int  # through the ingress
    filename: str = "upload.wav"  # what the client claims; never consulted by the service

    @property
    def accepted(self) -> bool:
        return self.expected_slug is None


def tone_wav(seconds: float = 1.0, rate: int = _RATE, channels: int = 1) -> bytes:
    return encode(tone(seconds, rate, channels), rate, "wav")


def embedded_mid_file(container: bytes, payload: bytes) -> bytes:
    """`container` with `payload` written over its middle bytes (the WAV's samples), same length."""
    start = (len(container) - len(payload)) // 2 & ~1  # even: keep later samples aligned
    return container[:start] + payload + container[start + len(payload) :]


def wav_header(channels: int, rate: int, data_bytes: int, riff_bytes: int | None = None) -> bytes:
    """A 16-bit PCM WAV header that says whatever it is told (block align wraps like a uint16)."""
    block_align = (channels * 2) & 0xFFFF
    byte_rate = (rate * channels * 2) & 0xFFFFFFFF
    fmt = struct.pack("<HHIIHH", 1, channels, rate, byte_rate, block_align, 16)
    if riff_bytes is None:
        riff_bytes = 4 + (8 + len(fmt)) + 8 + data_bytes
    return (
        b"RIFF" + struct.pack("<I", riff_bytes) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"data" + struct.pack("<I", data_bytes)
    )  # fmt: skip


def silent_pcm(seconds: float) -> bytes:
    """16 kHz mono 16-bit silence, the samples behind a hand-written header."""
    return bytes(round(seconds * _RATE) * 2)


def zip_archive(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def random_bytes(size: int) -> bytes:
    return np.random.default_rng(_SEED).bytes(size)


def _truncated_wav() -> bytes:
    whole = tone_wav(2.0)
    return whole[: len(whole) // 2 + 1]  # an odd length: the cut falls inside a sample


def _wav_claiming_4_gib() -> bytes:
    # Both sizes just under 4 GiB (0xFFFFFFFF itself means "unknown" to some readers).
    claimed = 0xFFFF_FFF0
    return wav_header(1, _RATE, data_bytes=claimed, riff_bytes=claimed) + silent_pcm(1.0)


def _mp3_with_big_cover() -> bytes:
    # FFmpeg's muxer writes the 120 kB APIC frame first, hiding the audio from a 64 KiB sniff.
    return encode(tone(1.0, _RATE), _RATE, "mp3", cover_art=png_image(200, noise_seed=_SEED))


def _cases() -> list[HostileCase]:
    def refused(
        name: str, build: Callable[[], bytes], slug: str, status: int = 422, filename: str = "upload.wav"
    ) -> HostileCase:
        return HostileCase(name, build, slug, status, filename)

    def accepted(name: str, build: Callable[[], bytes]) -> HostileCase:
        return HostileCase(name, build, None, ACCEPTED_STATUS)

    return [
        # Not audio at all: libmagic's allow-list refuses them before anything parses them.
        refused("empty file", lambda: b"", "unsupported-media-type", 415),
        refused("text file named .wav", lambda: b"This is not audio.\n" * 40, "unsupported-media-type", 415),
        refused("random bytes", lambda: random_bytes(64 * 1024), "unsupported-media-type", 415),
        refused("EICAR alone", eicar, MALWARE_DETECTED, filename="eicar.wav"),
        # Looks like audio to libmagic, holds none.
        refused(
            "random bytes behind an MP3 sync word",
            lambda: b"\xff\xfb\x90\x64" + random_bytes(64 * 1024),
            "empty-audio",
            filename="upload.mp3",
        ),
        refused("WAV header with no samples", lambda: wav_header(1, _RATE, data_bytes=0), "empty-audio"),
        # Lying or broken headers.
        accepted("truncated WAV, cut mid-sample", _truncated_wav),
        accepted("WAV header claiming 4 GiB of samples", _wav_claiming_4_gib),
        refused(
            "WAV header claiming 65 535 channels",  # FFmpeg refuses it before our channel cap
            lambda: wav_header(65_535, _RATE, data_bytes=len(silent_pcm(0.1))) + silent_pcm(0.1),
            "undecodable-audio",
        ),
        refused("WAV with 16 channels", lambda: tone_wav(0.25, channels=16), "too-many-channels"),
        refused("WAV at 384 kHz", lambda: tone_wav(0.25, rate=384_000), "sample-rate-too-high"),
        # Duration bombs: tiny uploads, hours of decoded audio.
        refused(
            "1 h of 16 kHz silence (FLAC)",
            lambda: silence_flac(3600, _RATE, 1),
            "audio-too-long",
            filename="upload.flac",
        ),
        refused(
            "1 h of 16 kHz silence, length undeclared (FLAC)",
            lambda: silence_flac(3600, _RATE, 1, declare_length=False),
            "audio-too-long",
            filename="upload.flac",
        ),
        refused(
            "1 h of 192 kHz 7.1 silence (FLAC)",
            lambda: silence_flac(3600, 192_000, 8),
            "audio-too-long",
            filename="upload.flac",
        ),
        # More than one audio stream.
        refused(
            "Ogg with a VP8 video stream",
            lambda: encode(tone(1.0, _RATE), _RATE, "ogg-opus", video_codec="libvpx"),
            "not-single-audio-stream",
            filename="upload.ogg",
        ),
        refused(
            "Matroska with two audio streams",
            lambda: encode(tone(1.0, _RATE), _RATE, "mkv", audio_streams=2),
            "not-single-audio-stream",
            filename="upload.mka",
        ),
        # Leading metadata: skipped by its declared size, and only when it is well formed.
        accepted("MP3 with 120 kB of cover art", _mp3_with_big_cover),
        refused(
            "ID3v2 tag declaring more bytes than the upload",
            lambda: b"ID3\x03\x00\x00\x7f\x7f\x7f\x7f" + _mp3_with_big_cover(),
            "unsupported-media-type",
            415,
            filename="upload.mp3",
        ),
        refused(
            "ID3v2 tag in front of text",
            lambda: with_cover_art(b"This is not audio.\n" * 40),
            "unsupported-media-type",
            415,
            filename="upload.mp3",
        ),
        # Polyglots and malware.
        accepted(
            "WAV with a ZIP appended",
            lambda: tone_wav() + zip_archive({"readme.txt": b"nothing to see\n" * 20}),
        ),
        refused(
            "WAV with a ZIP holding EICAR appended",
            lambda: tone_wav() + zip_archive({"eicar.com": eicar()}),
            MALWARE_DETECTED,
        ),
        refused("EICAR mid-file in a WAV", lambda: embedded_mid_file(tone_wav(), eicar()), MALWARE_DETECTED),
        refused(
            "test marker mid-file in a WAV", lambda: embedded_mid_file(tone_wav(), MARKER), MALWARE_DETECTED
        ),
    ]


HOSTILE_CASES: list[HostileCase] = _cases()
