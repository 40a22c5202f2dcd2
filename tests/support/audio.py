"""Generate test audio offline: tones, encoded containers, and silent FLAC "duration bombs".

Everything here is built at run time from PyAV encoders (or, for the bombs, by hand) so the tests
carry no binary fixtures. Samples are float32 arrays shaped (channels, frames), values in [-1, 1],
which is PyAV's planar layout.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np


@dataclass(frozen=True)
class ContainerEncoding:
    """How to write one test container: PyAV muxer name and the audio encoder it carries."""

    muxer: str
    codec: str
    codec_options: tuple[tuple[str, str], ...] = ()
    muxer_options: tuple[tuple[str, str], ...] = ()
    layout: str | None = None  # set when the encoder takes only one layout; PyAV remixes to it


CONTAINERS: dict[str, ContainerEncoding] = {
    "wav": ContainerEncoding("wav", "pcm_s16le"),
    "wav-float": ContainerEncoding("wav", "pcm_f32le"),  # keeps out-of-range and non-finite values
    "flac": ContainerEncoding("flac", "flac"),
    "mp3": ContainerEncoding("mp3", "libmp3lame"),
    # Bare MPEG frames (no ID3 tag, no Xing header), as a stream rip has: files concatenate cleanly.
    "mp3-bare": ContainerEncoding(
        "mp3", "libmp3lame", muxer_options=(("id3v2_version", "0"), ("write_xing", "0"))
    ),
    "ogg-opus": ContainerEncoding("ogg", "libopus"),
    # FFmpeg's own Vorbis encoder is experimental and stereo-only; the wheel has no libvorbis.
    "ogg-vorbis": ContainerEncoding(
        "ogg", "vorbis", codec_options=(("strict", "experimental"),), layout="stereo"
    ),
    "m4a": ContainerEncoding("ipod", "aac"),
    "mp4": ContainerEncoding("mp4", "aac"),
    "mov": ContainerEncoding("mov", "aac"),
    "3gp": ContainerEncoding("3gp", "aac"),
    "webm": ContainerEncoding("webm", "libopus"),
    "mkv": ContainerEncoding("matroska", "flac"),
    "aiff": ContainerEncoding("aiff", "pcm_s16be"),
}

_VIDEO_SIZE = 32  # pixels per side of the test video stream: small keeps encoding instant
_VIDEO_FPS = 5


def tone(seconds: float, rate: int, channels: int = 1, frequency: float = 440.0) -> np.ndarray:
    """A sine tone at half amplitude, the same in every channel, shaped (channels, frames)."""
    times = np.arange(round(seconds * rate), dtype=np.float64) / rate
    wave = (0.5 * np.sin(2 * np.pi * frequency * times)).astype(np.float32)
    return np.repeat(wave[np.newaxis, :], channels, axis=0)


def channel_layout(channels: int) -> str:
    """FFmpeg's default layout name for a channel count ("mono", "stereo", "16c" ...)."""
    return {1: "mono", 2: "stereo"}.get(channels, f"{channels}c")


def encode(
    samples: np.ndarray,
    rate: int,
    container: str,
    *,
    audio_streams: int = 1,
    video_codec: str | None = None,
    cover_art: bytes | None = None,
) -> bytes:
    """Encode planar float32 samples into one of CONTAINERS, optionally with a video stream.

    With `audio_streams` > 1 every audio stream carries the same samples. `cover_art` (a PNG) is
    written by the muxer itself as an attached picture, where real taggers put it: an ID3v2 APIC
    frame in MP3, a PICTURE metadata block in FLAC, a `covr` box inside `moov` in MP4. When the encoder cannot
    take `rate` (Opus: 8/12/16/24/48 kHz) or the channel count (Vorbis: stereo only), PyAV
    converts to what it supports, so the decoded source may differ.
    """
    encoding = CONTAINERS[container]
    layout = channel_layout(samples.shape[0])
    buffer = io.BytesIO()
    muxer_options = dict(encoding.muxer_options)
    with av.open(buffer, "w", format=encoding.muxer, options=muxer_options) as output:
        streams = [
            output.add_stream(
                encoding.codec,
                rate=_supported_rate(encoding.codec, rate),
                layout=encoding.layout or layout,
                options=dict(encoding.codec_options),
            )
            for _ in range(audio_streams)
        ]
        video = _add_video_stream(output, video_codec) if video_codec else None
        if cover_art is not None:
            _mux_cover_art(output, cover_art)

        # Interleaved, one plane: PyAV 18 walks past the plane array of planar frames with more
        # than 8 channels.
        interleaved = np.ascontiguousarray(samples.T, dtype=np.float32).reshape(1, -1)
        for audio in streams:
            frame = av.AudioFrame.from_ndarray(interleaved, format="flt", layout=layout)
            frame.sample_rate = rate
            frame.pts = 0
            frame.time_base = Fraction(1, rate)
            output.mux(audio.encode(frame))
            output.mux(audio.encode(None))
        if video is not None:
            _write_video_frames(output, video, seconds=samples.shape[1] / rate)
    return buffer.getvalue()


def png_image(size: int, *, noise_seed: int | None = None) -> bytes:
    """A square PNG, for cover art and for "not audio" uploads.

    Black by default; with `noise_seed` its pixels are random, so it does not compress and weighs
    a little over size * size * 3 bytes, as a photographic cover does.
    """
    context = av.CodecContext.create("png", "w")
    context.width = context.height = size
    context.pix_fmt = "rgb24"
    context.time_base = Fraction(1, 1)
    shape = (size, size, 3)
    pixels = (
        np.zeros(shape, dtype=np.uint8)
        if noise_seed is None
        else np.random.default_rng(noise_seed).integers(0, 256, shape, dtype=np.uint8)
    )
    frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
    return b"".join(bytes(packet) for packet in context.encode(frame) + context.encode(None))


def id3v2_tag(frames: bytes, *, major_version: int = 3, footer: bool = False) -> bytes:
    """An ID3v2 tag around already-built frames; a v2.4 tag may end with a footer ("3DI")."""
    flags = b"\x10" if footer else b"\x00"
    size = _syncsafe(len(frames))
    tag = b"ID3" + bytes([major_version, 0]) + flags + size + frames
    return tag + (b"3DI" + bytes([major_version, 0]) + flags + size if footer else b"")


def text_frame(frame_id: bytes, text: str) -> bytes:
    """An ID3v2.3 text frame (TIT2 title, TPE1 artist ...), latin-1 encoded."""
    body = b"\x00" + text.encode("latin-1")
    return frame_id + len(body).to_bytes(4, "big") + b"\x00\x00" + body


def wav_with_chunks_before_fmt(wav: bytes, chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A WAV with extra chunks (id, body) between "WAVE" and `fmt `, as Broadcast WAV tools write
    bext and LIST/INFO; RIFF's size is updated and odd-sized bodies padded, as RIFF requires."""
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
    extra = b"".join(
        chunk_id + len(body).to_bytes(4, "little") + body + b"\x00" * (len(body) % 2)
        for chunk_id, body in chunks
    )
    rest = wav[12:]
    return b"RIFF" + (4 + len(extra) + len(rest)).to_bytes(4, "little") + b"WAVE" + extra + rest


def with_cover_art(mp3: bytes, picture: bytes | None = None) -> bytes:
    """Prefix an MP3 with an ID3v2.3 tag holding a PNG (APIC frame, front cover), as taggers do.

    PyAV's MP3s already start with their own small ID3v2.4 tag, so the result has two tags.
    """
    picture = png_image(8) if picture is None else picture
    apic_body = b"\x00" + b"image/png\x00" + b"\x03" + b"\x00" + picture  # latin-1, front cover
    return id3v2_tag(b"APIC" + len(apic_body).to_bytes(4, "big") + b"\x00\x00" + apic_body) + mp3


def silence_flac(
    seconds: float,
    rate: int,
    channels: int,
    *,
    declare_length: bool = True,
    block_size: int = 16384,
) -> bytes:
    """A valid FLAC of digital silence, written by hand because encoding hours of audio is slow.

    Every frame is a run of CONSTANT subframes (3 bytes a channel), so an hour of 192 kHz 7.1 takes
    about 1.5 MB and a fraction of a second to build. With `declare_length=False` STREAMINFO says
    "length unknown", as a streaming encoder would, so only counting while decoding can catch it.
    """
    total_samples = round(seconds * rate)
    streaminfo = _pack_bits(
        (block_size, 16), (block_size, 16),  # min and max block size
        (0, 24), (0, 24),  # min and max frame size: unknown
        (rate, 20), (channels - 1, 3), (16 - 1, 5),  # 16 bits per sample
        (total_samples if declare_length else 0, 36),
        (0, 128),  # MD5 of the audio: 0 means "not computed"
    )
    parts = [b"fLaC", _pack_bits((1, 1), (0, 7), (len(streaminfo), 24)), streaminfo]
    subframes = b"\x00\x00\x00" * channels  # CONSTANT subframe, value 0, 16 bits
    for frame_number, first_sample in enumerate(range(0, total_samples, block_size)):
        frame_samples = min(block_size, total_samples - first_sample)
        header = (
            _pack_bits(
                (0b11111111111110, 14), (0, 1), (0, 1),  # sync, reserved, fixed block size
                (0b0111, 4), (0b0000, 4),  # block size in 16 bits at the end; rate from STREAMINFO
                (channels - 1, 4), (0b100, 3), (0, 1),  # independent channels, 16 bits, reserved
            )
            + chr(frame_number).encode("utf-8", "surrogatepass")  # FLAC's UTF-8 style number
            + (frame_samples - 1).to_bytes(2, "big")
        )
        frame = header + bytes([_crc8(header)]) + subframes
        parts.append(frame + _crc16(frame).to_bytes(2, "big"))
    return b"".join(parts)


def _supported_rate(codec_name: str, rate: int) -> int:
    rates = av.codec.Codec(codec_name, "w").audio_rates
    return rate if not rates or rate in rates else min(rates, key=lambda option: abs(option - rate))


def _add_video_stream(output: av.container.OutputContainer, codec: str) -> av.VideoStream:
    video = output.add_stream(codec, rate=_VIDEO_FPS)
    video.width = video.height = _VIDEO_SIZE
    video.pix_fmt = "yuv420p"
    return video


def _mux_cover_art(output: av.container.OutputContainer, picture: bytes) -> None:
    """Mux a PNG as an attached-picture stream; muxers hold the audio back until it arrives."""
    stream = output.add_stream("png")
    stream.width = stream.height = 1  # not read: the muxer stores the picture's bytes as they are
    stream.pix_fmt = "rgb24"
    stream.disposition = av.stream.Disposition.attached_pic
    packet = av.Packet(picture)
    packet.stream = stream
    packet.pts = packet.dts = 0
    output.mux(packet)


def _write_video_frames(
    output: av.container.OutputContainer, video: av.VideoStream, seconds: float
) -> None:
    image = np.zeros((_VIDEO_SIZE, _VIDEO_SIZE, 3), dtype=np.uint8)
    for index in range(max(1, int(seconds * _VIDEO_FPS))):
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = index
        output.mux(video.encode(frame))
    output.mux(video.encode(None))


def _syncsafe(value: int) -> bytes:
    """ID3v2 tag sizes use 7 bits per byte."""
    return bytes((value >> shift) & 0x7F for shift in (21, 14, 7, 0))


def _pack_bits(*fields: tuple[int, int]) -> bytes:
    """Big-endian bit packing of (value, width) fields whose widths add up to whole bytes."""
    packed, width_total = 0, 0
    for value, width in fields:
        packed = (packed << width) | value
        width_total += width
    return packed.to_bytes(width_total // 8, "big")


def _crc_table(polynomial: int, width: int) -> list[int]:
    top_bit, mask = 1 << (width - 1), (1 << width) - 1
    table = []
    for byte in range(256):
        crc = byte << (width - 8)
        for _ in range(8):
            crc = ((crc << 1) ^ polynomial) if crc & top_bit else crc << 1
        table.append(crc & mask)
    return table


_CRC8_TABLE = _crc_table(0x07, 8)
_CRC16_TABLE = _crc_table(0x8005, 16)


def _crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = _CRC8_TABLE[crc ^ byte]
    return crc


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16_TABLE[(crc >> 8) ^ byte]
    return crc
