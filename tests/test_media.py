"""Sniffing and bounded decoding of untrusted uploads (serve_app.media), on audio generated here.

Decoding writes PCM into a real spool in pytest's temporary directory; the tests read the samples
back with read_samples, as an aligner does.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import subprocess
import sys
import tracemalloc
import wave
import zipfile
from dataclasses import dataclass
from pathlib import Path

import av
import av.error
import magic
import numpy as np
import pytest

from deployments.backends.base import SAMPLE_RATE
from serve_app.media import (
    ENVELOPE_FRAME_SAMPLES,
    DecodedAudio,
    DecodeLimits,
    MediaRejected,
    Spool,
    decode_audio,
    read_samples,
    sniff_container,
)
from serve_app.media.clamav import ClamdScanner
from serve_app.media.decode import container_options
from serve_app.media.inspect import Rejection, ScanUnavailable, inspect_upload
from serve_app.media.sniff import DEMUXER_BY_MIME, MAX_LEADING_TAGS, SNIFF_BYTES
from tests.support.audio import (
    CONTAINERS,
    encode,
    id3v2_tag,
    png_image,
    silence_flac,
    text_frame,
    tone,
    wav_with_chunks_before_fmt,
    with_cover_art,
)
from tests.support.hostile import embedded_mid_file
from tests.support.spool import spool_entries
from tools.local_services import eicar

REPO_ROOT = Path(__file__).resolve().parents[1]
TONE_HZ = 440.0
# One codec frame at the coarsest framing used here (AAC: 1024 samples at 16 kHz); bare MP3 is
# left out of the duration checks because without a LAME header its encoder delay is not trimmed.
DURATION_TOLERANCE_SECONDS = 1024 / 16_000

EXPECTED_DEMUXER = {
    "wav": "wav",
    "wav-float": "wav",
    "flac": "flac",
    "mp3": "mp3",
    "mp3-bare": "mp3",
    "ogg-opus": "ogg",
    "ogg-vorbis": "ogg",
    "m4a": "mov",
    "mp4": "mov",
    "mov": "mov",
    "3gp": "mov",
    "webm": "matroska",
    "mkv": "matroska",
    "aiff": "aiff",
}
ROUND_TRIP_CONTAINERS = [name for name in CONTAINERS if name != "mp3-bare"]


_spool: Spool | None = None  # set for each test by the fixture below


@pytest.fixture(autouse=True)
def spool_dir(tmp_path) -> Path:
    """A fresh spool for each test, which the helpers below decode into."""
    global _spool
    _spool = Spool(tmp_path / "spool")
    return tmp_path / "spool"


@dataclass(frozen=True)
class _Decoded:
    """A DecodedAudio with its samples read back from the PCM file (its attributes pass through)."""

    audio: DecodedAudio
    samples: np.ndarray

    def __getattr__(self, name: str):
        return getattr(self.audio, name)


def _sniff(upload: bytes) -> str:
    return sniff_container(io.BytesIO(upload))


def _decode(data: bytes, demuxer: str, limits: DecodeLimits = DecodeLimits()) -> _Decoded:
    with _spool.writer("pcm") as sink:
        audio = decode_audio(io.BytesIO(data), demuxer, limits, sink)
    assert os.path.getsize(audio.pcm_path) == 2 * audio.sample_count
    samples = read_samples(audio.pcm_path, 0, audio.sample_count)
    _spool.remove(audio.pcm_path)
    return _Decoded(audio, samples)


def _sniff_and_decode(data: bytes, limits: DecodeLimits = DecodeLimits()) -> _Decoded:
    return _decode(data, _sniff(data), limits)


def _rejection(data: bytes, limits: DecodeLimits = DecodeLimits()) -> MediaRejected:
    with pytest.raises(MediaRejected) as caught:
        _sniff_and_decode(data, limits)
    return caught.value


def _dominant_frequency(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.argmax(spectrum)) * SAMPLE_RATE / samples.size


def _rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))


# --- sniffing ---------------------------------------------------------------------------------


def test_every_test_container_sniffs_to_its_demuxer():
    assert set(EXPECTED_DEMUXER) == set(CONTAINERS)
    for name in CONTAINERS:
        upload = encode(tone(0.5, 16_000), 16_000, name)
        assert _sniff(upload) == EXPECTED_DEMUXER[name], name


def _zip_archive() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("speech.wav", b"not really audio")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "upload",
    [
        pytest.param(b"", id="empty"),
        pytest.param("a transcript, not audio\n".encode() * 20, id="text"),
        pytest.param(np.random.default_rng(7).bytes(4096), id="random-bytes"),
        pytest.param(_zip_archive(), id="zip"),
        pytest.param(png_image(16), id="png"),
        pytest.param(
            b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n", id="hls-playlist"
        ),
        pytest.param(b"ffconcat version 1.0\nfile /etc/passwd\n", id="ffconcat"),
    ],
)
def test_sniff_rejects_what_is_not_allowed_audio(upload: bytes):
    with pytest.raises(MediaRejected) as caught:
        _sniff(upload)
    assert caught.value.reason == "unsupported-media-type"


# --- leading metadata -------------------------------------------------------------------------

# A photographic 200 x 200 cover: about 120 kB of PNG, more than libmagic is shown at once.
BIG_COVER = png_image(200, noise_seed=11)


def _libmagic_alone(upload: bytes) -> str | None:
    """The demuxer libmagic would name from the upload's first bytes, without skipping tags."""
    return DEMUXER_BY_MIME.get(magic.from_buffer(upload[:SNIFF_BYTES], mime=True))


def _box_order(mp4: bytes) -> list[bytes]:
    order, position = [], 0
    while position < len(mp4):
        order.append(mp4[position + 4 : position + 8])
        position += int.from_bytes(mp4[position : position + 4], "big")
    return order


def _flac_block_types(flac: bytes) -> list[int]:
    types, position = [], 4
    while True:
        header = flac[position]
        types.append(header & 0x7F)
        position += 4 + int.from_bytes(flac[position + 1 : position + 4], "big")
        if header & 0x80:
            return types


def test_big_cover_is_bigger_than_what_libmagic_sees():
    assert len(BIG_COVER) > 1.5 * SNIFF_BYTES


@pytest.mark.parametrize("container", ["mp3", "flac", "mp4"])
def test_big_cover_art_written_by_the_muxer_is_accepted(container: str):
    upload = encode(tone(2.0, 16_000), 16_000, container, cover_art=BIG_COVER)
    assert _sniff(upload) == EXPECTED_DEMUXER[container]
    decoded = _sniff_and_decode(upload)
    assert abs(decoded.duration_seconds - 2.0) <= DURATION_TOLERANCE_SECONDS + 0.1  # MP3 delay
    assert abs(_dominant_frequency(decoded.samples) - TONE_HZ) < 2.0


def test_mp3_cover_art_hides_the_audio_from_libmagic_alone():
    # Why ID3v2 tags are skipped: FFmpeg's own MP3 muxer puts the APIC frame first.
    upload = encode(tone(2.0, 16_000), 16_000, "mp3", cover_art=BIG_COVER)
    assert upload.startswith(b"ID3")
    assert _libmagic_alone(upload) is None


def test_flac_picture_block_needs_no_skipping():
    upload = encode(tone(2.0, 16_000), 16_000, "flac", cover_art=BIG_COVER)
    assert 6 in _flac_block_types(upload)  # a PICTURE metadata block before the audio frames
    assert _libmagic_alone(upload) == "flac"  # named from "fLaC" alone


def test_mp4_with_moov_after_mdat_and_big_free_box_needs_no_skipping():
    mp4 = encode(tone(2.0, 16_000), 16_000, "mp4", cover_art=BIG_COVER)
    order = _box_order(mp4)
    assert order.index(b"mdat") < order.index(b"moov")  # index and cover after the audio
    # Free space between the audio and the index, as editors leave it; chunk offsets stay valid.
    moov_at = mp4.index(b"moov") - 4
    free = (8 + 100_000).to_bytes(4, "big") + b"free" + bytes(100_000)
    upload = mp4[:moov_at] + free + mp4[moov_at:]
    assert _libmagic_alone(upload) == "mov"  # named from the leading ftyp box
    decoded = _sniff_and_decode(upload)
    assert abs(decoded.duration_seconds - 2.0) <= DURATION_TOLERANCE_SECONDS


def test_wav_with_big_bext_and_list_chunks_before_fmt_needs_no_skipping():
    wav = encode(tone(2.0, 16_000), 16_000, "wav")
    bext = b"Speech recorder".ljust(256, b"\x00") + bytes(90_000)  # description ... coding history
    info = b"INFO" + b"ICMT" + (70_001).to_bytes(4, "little") + b"c" * 70_001 + b"\x00"
    upload = wav_with_chunks_before_fmt(wav, [(b"bext", bext), (b"LIST", info)])
    assert upload.index(b"fmt ") > SNIFF_BYTES
    assert _libmagic_alone(upload) == "wav"  # named from "RIFF....WAVE" alone
    decoded = _sniff_and_decode(upload)
    assert decoded.duration_seconds == pytest.approx(2.0, abs=1e-3)


@pytest.mark.parametrize(
    "upload",
    [
        encode(tone(3.0, 16_000), 16_000, "wav"),
        encode(tone(2.0, 44_100, channels=2), 44_100, "wav"),
        encode(tone(1.0, 48_000, channels=6), 48_000, "wav"),
        wav_with_chunks_before_fmt(encode(tone(2.0, 22_050), 22_050, "wav"), [(b"LIST", b"INFO" + b"ICMT" + (9).to_bytes(4, "little") + b"c" * 9 + b"\x00")]),
    ],
    ids=["16k-mono", "44k-stereo", "48k-5.1", "list-before-fmt"],
)
def test_wav_opened_from_its_header_alone_decodes_as_with_the_full_probe(upload: bytes, monkeypatch):
    """WAV skips FFmpeg's stream probe (decode.WAV_HEADER_ONLY_PROBE); nothing it decodes may change."""
    from serve_app.media import decode

    fast = _decode(upload, "wav")
    monkeypatch.setattr(decode, "WAV_HEADER_ONLY_PROBE", {})
    assert container_options("wav").get("probesize") is None
    probed = _decode(upload, "wav")
    assert (fast.sample_count, fast.source_sample_rate, fast.source_channels, fast.codec) == (
        probed.sample_count, probed.source_sample_rate, probed.source_channels, probed.codec,
    )
    assert np.array_equal(fast.samples, probed.samples) and fast.sample_count > 0


def test_repeated_id3v2_tags_are_all_skipped():
    mp3 = encode(tone(2.0, 16_000), 16_000, "mp3")  # already starts with a small ID3v2.4 tag
    upload = with_cover_art(with_cover_art(mp3, BIG_COVER), BIG_COVER)
    assert _libmagic_alone(upload) is None
    assert _sniff_and_decode(upload).duration_seconds == pytest.approx(2.0, abs=0.15)


def test_id3v2_4_footer_is_skipped_too():
    bare = encode(tone(2.0, 16_000), 16_000, "mp3-bare")
    upload = id3v2_tag(text_frame(b"TIT2", "Episode 1"), major_version=4, footer=True) + bare
    assert _libmagic_alone(upload) is None  # the "3DI" footer hides the audio from libmagic
    assert _sniff(upload) == "mp3"
    assert _sniff_and_decode(upload).duration_seconds == pytest.approx(2.0, abs=0.15)


def test_id3v2_tag_in_front_of_flac_is_skipped():
    upload = with_cover_art(encode(tone(2.0, 16_000), 16_000, "flac"), BIG_COVER)
    assert _sniff(upload) == "flac"
    assert _sniff_and_decode(upload).duration_seconds == pytest.approx(2.0, abs=1e-3)


def _tag_claiming(size_bytes: bytes) -> bytes:
    return b"ID3\x03\x00\x00" + size_bytes


_BARE_MP3 = encode(tone(1.0, 16_000), 16_000, "mp3-bare")


@pytest.mark.parametrize(
    "upload, detail",
    [
        pytest.param(_tag_claiming(b"\x7f\x7f\x7f\x7f") + _BARE_MP3, "more bytes", id="size-past-end"),
        pytest.param(b"ID3\x03\x00", "more bytes", id="header-cut"),
        pytest.param(_tag_claiming(b"\x00\x00\x80\x00") + _BARE_MP3, "malformed", id="not-syncsafe"),
        pytest.param(b"ID3\x09\x00\x00\x00\x00\x00\x00" + _BARE_MP3, "malformed", id="unknown-version"),
        pytest.param(id3v2_tag(b"") * (MAX_LEADING_TAGS + 1) + _BARE_MP3, "more than", id="too-many-tags"),
        pytest.param(with_cover_art(b"", BIG_COVER), "not a supported", id="tag-then-nothing"),
        pytest.param(with_cover_art(b"just some text\n" * 100), "not a supported", id="tag-then-text"),
        pytest.param(
            with_cover_art(encode(tone(1.0, 16_000), 16_000, "wav")), "not a supported", id="tag-then-wav"
        ),
    ],
)
def test_leading_id3v2_tags_are_skipped_strictly(upload: bytes, detail: str):
    with pytest.raises(MediaRejected) as caught:
        _sniff(upload)
    assert caught.value.reason == "unsupported-media-type"
    assert detail in caught.value.detail


# --- decoding each container ------------------------------------------------------------------


@pytest.mark.parametrize(
    "rate, channels", [(16_000, 1), (48_000, 2)], ids=["16k-mono", "48k-stereo"]
)
@pytest.mark.parametrize("container", ROUND_TRIP_CONTAINERS)
def test_container_decodes_to_16k_mono_float32(container: str, rate: int, channels: int):
    seconds = 3.0
    decoded = _sniff_and_decode(encode(tone(seconds, rate, channels, TONE_HZ), rate, container))

    assert decoded.samples.dtype == np.float32
    assert decoded.samples.ndim == 1 and decoded.samples.flags.c_contiguous
    assert decoded.duration_seconds == decoded.samples.size / SAMPLE_RATE
    assert abs(decoded.duration_seconds - seconds) <= DURATION_TOLERANCE_SECONDS
    assert abs(_dominant_frequency(decoded.samples) - TONE_HZ) < 2.0
    assert _rms(decoded.samples) > 0.2  # the tone, not silence (RMS of the source is 0.35)
    assert decoded.container == EXPECTED_DEMUXER[container]
    encoder_rate = 48_000 if CONTAINERS[container].codec == "libopus" else rate  # Opus is 48 kHz
    assert decoded.source_sample_rate == encoder_rate
    assert decoded.source_channels == (2 if container == "ogg-vorbis" else channels)  # stereo-only


def test_stereo_is_averaged_not_summed():
    mono = _sniff_and_decode(encode(tone(2.0, 48_000, 1), 48_000, "flac"))
    stereo = _sniff_and_decode(encode(tone(2.0, 48_000, 2), 48_000, "flac"))
    assert stereo.source_channels == 2
    assert _rms(stereo.samples) == pytest.approx(_rms(mono.samples), rel=0.01)


def test_codec_is_reported_by_its_codec_name():
    assert _sniff_and_decode(encode(tone(1.0, 16_000), 16_000, "m4a")).codec == "aac"
    assert _sniff_and_decode(encode(tone(1.0, 16_000), 16_000, "mp3")).codec == "mp3"


# FFmpeg reads about 5 s while opening a stream; a change after that is seen only while decoding.
SECONDS_BEFORE_FORMAT_CHANGE = 6.0


def _format_change(first_rate: int, first_channels: int, rate: int, channels: int) -> bytes:
    """Bare MPEG streams concatenate, as a stream rip does, changing format mid-stream."""
    before = tone(SECONDS_BEFORE_FORMAT_CHANGE, first_rate, first_channels)
    after = tone(1.0, rate, channels)
    return encode(before, first_rate, "mp3-bare") + encode(after, rate, "mp3-bare")


def test_format_change_mid_stream_is_resampled_too():
    decoded = _sniff_and_decode(_format_change(16_000, 1, 48_000, 2))
    assert decoded.source_sample_rate == 16_000 and decoded.source_channels == 1
    expected_seconds = SECONDS_BEFORE_FORMAT_CHANGE + 1.0
    assert decoded.duration_seconds == pytest.approx(expected_seconds, abs=0.25)  # encoder delays
    assert abs(_dominant_frequency(decoded.samples) - TONE_HZ) < 2.0


def test_out_of_range_float_samples_are_clipped():
    decoded = _sniff_and_decode(encode(3.0 * tone(1.0, 16_000), 16_000, "wav-float"))
    assert decoded.samples.max() <= 1.0 and decoded.samples.min() >= -1.0
    assert decoded.samples.max() == 1.0


def test_non_finite_float_samples_are_refused():
    samples = tone(1.0, 16_000)
    samples[0, 1000] = np.nan
    assert _rejection(encode(samples, 16_000, "wav-float")).reason == "undecodable-audio"


# --- stream rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "container, video_codec", [("mp4", "mpeg4"), ("webm", "libvpx"), ("mov", "mpeg4")]
)
def test_video_stream_is_refused(container: str, video_codec: str):
    upload = encode(tone(1.0, 16_000), 16_000, container, video_codec=video_codec)
    assert _rejection(upload).reason == "not-single-audio-stream"


def test_two_audio_streams_are_refused():
    upload = encode(tone(1.0, 16_000), 16_000, "mkv", audio_streams=2)
    assert _rejection(upload).reason == "not-single-audio-stream"


def test_mp3_cover_art_is_allowed_and_ignored():
    upload = with_cover_art(encode(tone(2.0, 16_000), 16_000, "mp3"))
    with av.open(io.BytesIO(upload), format="mp3") as container:  # the picture really is a stream
        assert any(stream.type == "video" for stream in container.streams)
    decoded = _sniff_and_decode(upload)
    assert abs(decoded.duration_seconds - 2.0) <= DURATION_TOLERANCE_SECONDS


# --- limits -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rate, channels", [(16_000, 1), (192_000, 8)], ids=["16k-mono", "192k-7.1"]
)
def test_hour_of_silence_is_refused_from_its_header(rate: int, channels: int):
    # The header's length refuses it before decoding; decoding 600 s of 192 kHz 7.1 up to the cap
    # would take seconds and end in decode-timeout under this clock limit.
    rejection = _rejection(silence_flac(3600, rate, channels), DecodeLimits(max_wall_seconds=0.5))
    assert rejection.reason == "audio-too-long"
    assert "600 s" in rejection.detail


_PEAK_RSS_SCRIPT = """
import io, json, resource, sys, tempfile
from serve_app.media import DecodeLimits, MediaRejected, Spool, decode_audio
from tests.support.audio import silence_flac

bomb = io.BytesIO(silence_flac(3600, 16_000, 1, declare_length=False))
spool = Spool(sys.argv[1])
before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    with spool.writer("pcm") as sink:
        decode_audio(bomb, "flac", DecodeLimits(max_decoded_seconds=600), sink)
    reason = None
except MediaRejected as rejection:
    reason = rejection.reason
growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib
print(json.dumps({"reason": reason, "growth_mib": growth_kib / 1024}))
"""


def test_hour_of_silence_without_length_is_stopped_at_the_cap_with_bounded_memory(spool_dir):
    # A fresh process, so its peak RSS reflects this decode alone. Decoding the whole hour into
    # memory would need 230 MiB (float32); streamed to the spool it needs a few codec frames.
    completed = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_SCRIPT, str(spool_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result = json.loads(completed.stdout)
    assert result["reason"] == "audio-too-long"
    assert result["growth_mib"] < 30
    assert spool_entries(spool_dir) == []  # the refused decode's PCM is gone


def test_duration_is_counted_while_decoding_when_the_header_cannot_be_trusted():
    # MP3's declared duration is ignored (it may be a bitrate guess), so only counting stops it.
    upload = encode(tone(5.0, 16_000), 16_000, "mp3")
    assert _rejection(upload, DecodeLimits(max_decoded_seconds=2)).reason == "audio-too-long"


def test_too_many_channels_refused_before_decoding():
    upload = encode(tone(0.5, 16_000, 16), 16_000, "wav")
    rejection = _rejection(upload, DecodeLimits(max_channels=8))
    assert rejection.reason == "too-many-channels"
    assert "8 channels" in rejection.detail


def test_sample_rate_above_cap_refused():
    upload = encode(tone(0.5, 96_000), 96_000, "wav")
    assert _rejection(upload, DecodeLimits(max_sample_rate=48_000)).reason == "sample-rate-too-high"


def test_channel_count_rising_mid_stream_is_refused():
    upload = _format_change(16_000, 1, 16_000, 2)
    assert _rejection(upload, DecodeLimits(max_channels=1)).reason == "too-many-channels"


def test_sample_rate_rising_mid_stream_is_refused():
    upload = _format_change(16_000, 1, 48_000, 1)
    assert _rejection(upload, DecodeLimits(max_sample_rate=24_000)).reason == "sample-rate-too-high"


def test_wall_clock_limit_stops_a_long_decode():
    # An hour of 192 kHz 7.1 takes seconds to decode and resample; the cap on duration is lifted
    # so only the clock can stop it.
    upload = silence_flac(3600, 192_000, 8, declare_length=False)
    limits = DecodeLimits(max_decoded_seconds=7200, max_wall_seconds=0.1)
    assert _rejection(upload, limits).reason == "decode-timeout"


# --- broken and empty input -------------------------------------------------------------------


def test_wav_cut_inside_its_header_is_undecodable():
    upload = encode(tone(2.0, 16_000), 16_000, "wav")[:30]
    assert _sniff(upload) == "wav"
    assert _rejection(upload).reason == "undecodable-audio"


@pytest.mark.parametrize("container", ["wav", "flac"])
def test_upload_cut_mid_audio_decodes_what_is_there(container: str):
    upload = encode(tone(4.0, 16_000), 16_000, container)
    decoded = _sniff_and_decode(upload[: len(upload) // 2])
    assert 1.0 < decoded.duration_seconds < 3.0


def test_mp4_cut_before_its_index_is_undecodable():
    upload = encode(tone(4.0, 16_000), 16_000, "m4a")  # PyAV writes the moov index at the end
    assert _rejection(upload[: len(upload) // 2]).reason == "undecodable-audio"


def test_corruption_followed_by_more_audio_is_refused():
    # The second file's ID3 tag fails to decode, then its audio decodes again.
    upload = encode(tone(1.0, 16_000), 16_000, "mp3") + encode(tone(1.0, 16_000), 16_000, "mp3")
    assert _rejection(upload).reason == "undecodable-audio"


def test_wav_without_samples_is_empty_audio():
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(16_000)
    assert _rejection(buffer.getvalue()).reason == "empty-audio"


def test_empty_bytes_are_empty_audio():
    with pytest.raises(MediaRejected) as caught:
        _decode(b"", "wav")
    assert caught.value.reason == "empty-audio"


def test_undecodable_detail_is_generic_and_hides_ffmpeg():
    upload = b"RIFF\x24\x00\x00\x00WAVEfmt " + np.random.default_rng(3).bytes(64)
    with pytest.raises(MediaRejected) as caught:
        _decode(upload, "wav")
    rejection = caught.value
    assert rejection.reason == "undecodable-audio"
    assert rejection.detail == "the audio could not be decoded"
    assert rejection.__cause__ is None and rejection.__suppress_context__


def test_rejection_survives_pickling():
    # Ray carries exceptions between processes by pickling them.
    copy = pickle.loads(pickle.dumps(MediaRejected("audio-too-long", "too long")))
    assert (copy.reason, copy.detail) == ("audio-too-long", "too long")


def test_demuxer_outside_allow_list_is_a_programming_error():
    with pytest.raises(ValueError):
        _decode(b"#EXTM3U\n", "hls")


# --- FFmpeg confinement -----------------------------------------------------------------------


def test_container_options_stop_ffmpeg_following_a_playlist(tmp_path: Path):
    segment = tmp_path / "segment.mp3"
    segment.write_bytes(encode(tone(1.0, 16_000), 16_000, "mp3"))
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.0,\nfile://{segment}\n#EXT-X-ENDLIST\n"

    # Control: without the options FFmpeg's HLS demuxer reads the local file.
    with av.open(io.BytesIO(playlist.encode()), format="hls") as container:
        assert sum(len(packet.decode()) for packet in container.demux(audio=0)) > 0

    with pytest.raises(av.error.FFmpegError):
        with av.open(
            io.BytesIO(playlist.encode()), format="hls", container_options=container_options("hls")
        ) as container:
            list(container.demux(audio=0))


@pytest.mark.parametrize("option", ["enable_drefs", "use_absolute_path"])
def test_mov_reference_options_are_real_ffmpeg_options(option: str):
    # FFmpeg silently ignores unknown option names; an invalid value for a known one is an error.
    # So this proves the names we pin to "0" are ones the MOV demuxer actually reads.
    assert container_options("mov")[option] == "0"
    upload = encode(tone(0.5, 16_000), 16_000, "m4a")
    with pytest.raises(av.error.FFmpegError):
        av.open(io.BytesIO(upload), format="mov", container_options={option: "not-a-boolean"})


@pytest.mark.parametrize("declare_length", [True, False], ids=["declared", "undeclared"])
def test_decoding_work_is_capped_not_only_the_output_duration(declare_length):
    # 60 s is well under the 600 s duration cap, but at 192 kHz x 8 channels it is 2.4x the
    # default work budget (600 s of 48 kHz stereo): refused, with or without a declared length.
    bomb = silence_flac(60, 192_000, 8, declare_length=declare_length)
    rejection = _rejection(bomb)
    assert rejection.reason == "audio-too-long"
    assert "at most 37.5 s" in rejection.detail
    # The same length at 48 kHz stereo is within the budget.
    assert _sniff_and_decode(silence_flac(60, 48_000, 2, declare_length=declare_length)).duration_seconds == pytest.approx(60, abs=0.1)


# --- streamed decoding into the spool ---------------------------------------------------------


def _write_long_wav(path: Path, seconds: int, rate: int = 16_000) -> None:
    """A long 16-bit mono WAV of noise under a tone, written a second at a time."""
    rng = np.random.default_rng(5)
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        second = tone(1.0, rate)[0]
        for _ in range(seconds):
            noisy = second + rng.normal(0.0, 0.05, rate).astype(np.float32)
            writer.writeframes(np.clip(noisy * 32767, -32767, 32767).astype("<i2").tobytes())


def test_twenty_minutes_decode_in_bounded_memory(tmp_path, spool_dir):
    path = tmp_path / "long.wav"
    _write_long_wav(path, 20 * 60)
    limits = DecodeLimits(max_decoded_seconds=3600, max_wall_seconds=120)
    tracemalloc.start()
    try:
        with open(path, "rb") as source, _spool.writer("pcm") as sink:
            decoded = decode_audio(source, "wav", limits, sink)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    samples = 20 * 60 * SAMPLE_RATE
    assert decoded.sample_count == samples and decoded.duration_seconds == 1200
    assert os.path.getsize(decoded.pcm_path) == 2 * samples
    # 73 MiB as float32; what stays is the envelope (470 kB) and a few codec frames.
    assert peak < 4 * 1024 * 1024, peak
    assert decoded.envelope.size == samples // ENVELOPE_FRAME_SAMPLES
    middle = read_samples(decoded.pcm_path, samples // 2, samples // 2 + SAMPLE_RATE)
    assert abs(_dominant_frequency(middle) - TONE_HZ) < 2.0


def test_envelope_has_a_value_per_10_ms_frame_the_last_partial_one_included():
    silence = _sniff_and_decode(encode(np.zeros((1, 16_050), np.float32), 16_000, "wav"))
    assert silence.sample_count == 16_050
    assert silence.envelope.dtype == np.float32
    assert silence.envelope.size == math.ceil(16_050 / ENVELOPE_FRAME_SAMPLES) == 101
    assert silence.envelope.max() < 1e-6
    loud = _sniff_and_decode(encode(tone(1.0, 16_000), 16_000, "wav"))
    frames = loud.samples[: 100 * ENVELOPE_FRAME_SAMPLES].reshape(100, ENVELOPE_FRAME_SAMPLES)
    np.testing.assert_allclose(loud.envelope, np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1)), atol=1e-4)
    assert loud.envelope.min() > 0.2  # RMS of the tone is 0.35


def test_pcm_round_trips_within_one_step_of_int16():
    original = np.random.default_rng(9).uniform(-1.0, 1.0, (1, 32_000)).astype(np.float32)
    original[0, :2] = (-1.0, 1.0)
    decoded = _sniff_and_decode(encode(original, 16_000, "wav-float"))  # 16 kHz float: no resampling
    assert decoded.samples.size == original.shape[1]
    assert np.abs(decoded.samples - original[0]).max() <= 1 / 32767
    assert (decoded.samples[0], decoded.samples[1]) == (-1.0, 1.0)


def test_read_samples_reads_only_the_slice_and_refuses_past_the_end():
    decoded = _sniff_and_decode(encode(tone(1.0, 16_000), 16_000, "wav"))
    with _spool.writer("pcm") as sink:
        audio = decode_audio(io.BytesIO(encode(tone(1.0, 16_000), 16_000, "wav")), "wav", DecodeLimits(), sink)
    np.testing.assert_array_equal(read_samples(audio.pcm_path, 100, 260), decoded.samples[100:260])
    assert read_samples(audio.pcm_path, 5, 5).size == 0
    with pytest.raises(ValueError):
        read_samples(audio.pcm_path, 0, audio.sample_count + 1)
    with pytest.raises(ValueError):
        read_samples(audio.pcm_path, 10, 5)


def test_a_refused_decode_commits_no_pcm(spool_dir):
    with pytest.raises(MediaRejected):
        _decode(encode(tone(0.5, 16_000, 16), 16_000, "wav"), "wav", DecodeLimits(max_channels=8))
    assert spool_entries(spool_dir) == []


class _CountingReader(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data


def test_sniffing_seeks_past_a_20_mb_tag_instead_of_reading_it():
    upload = _CountingReader(with_cover_art(encode(tone(1.0, 16_000), 16_000, "mp3"), bytes(20 * 1024 * 1024)))
    assert sniff_container(upload) == "mp3"
    assert upload.bytes_read < 2 * SNIFF_BYTES


# --- the whole check: clamd, sniff, decode into the spool -------------------------------------


def _spooled_upload(data: bytes):
    with _spool.writer("upload") as writer:
        writer.write(data)
        return writer.commit()


@pytest.fixture
def clamd(clamd_server) -> ClamdScanner:
    return ClamdScanner(f"unix://{clamd_server.socket_path}", timeout_s=10)


def test_an_accepted_upload_leaves_its_pcm_and_the_upload(clamd, spool_dir):
    upload = _spooled_upload(encode(tone(2.0, 48_000, 2), 48_000, "flac"))
    verdict = inspect_upload(upload, clamd, DecodeLimits(), _spool)
    assert isinstance(verdict, DecodedAudio) and verdict.duration_seconds == pytest.approx(2.0, abs=1e-3)
    assert spool_entries(spool_dir) == sorted([os.path.basename(upload.path), os.path.basename(verdict.pcm_path)])
    assert abs(_dominant_frequency(read_samples(verdict.pcm_path, 0, verdict.sample_count)) - TONE_HZ) < 2.0


@pytest.mark.parametrize(
    "upload, unavailable",
    [
        pytest.param(embedded_mid_file(encode(tone(1.0, 16_000), 16_000, "wav"), eicar()), False, id="malware"),
        pytest.param(b"not audio at all\n" * 10, False, id="unsupported"),
        pytest.param(encode(tone(0.5, 16_000, 16), 16_000, "wav"), False, id="too-many-channels"),
        pytest.param(encode(tone(1.0, 16_000), 16_000, "wav"), True, id="clamd-down"),
    ],
)
def test_a_refused_upload_leaves_no_pcm(clamd, tmp_path, spool_dir, upload, unavailable):
    scanner = ClamdScanner(f"unix://{tmp_path / 'nothing.sock'}", timeout_s=1) if unavailable else clamd
    spooled = _spooled_upload(upload)
    verdict = inspect_upload(spooled, scanner, DecodeLimits(), _spool)
    assert isinstance(verdict, ScanUnavailable if unavailable else Rejection)
    assert spool_entries(spool_dir) == [os.path.basename(spooled.path)]  # the upload is the caller's to remove
