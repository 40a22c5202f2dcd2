"""Decode an untrusted upload to 16 kHz mono int16 PCM in a spool file, within hard limits.

The demuxer chosen by `sniff_container` is forced, so FFmpeg never probes its way into another
demuxer (HLS, concat, playlists), and every nested open is refused: the protocol whitelist is empty,
the format whitelist names only the forced demuxer, and MOV external data references stay off.

Limits are enforced as early as the information exists: channels and sample rate from the stream
header before decoding and again on every frame (they may change mid-stream); duration from the
header where it is exact, then counted frame by frame so decoding stops as soon as the cap is passed
(an hour of FLAC silence is a 50 KB upload that decodes to gigabytes); wall-clock time per packet.
A corrupt packet is tolerated only as the last one (a truncated upload); anywhere else the upload
is refused.

Nothing is held whole: the upload is read from its spool file by FFmpeg (a Python file object as
custom I/O, which also keeps FFmpeg's file protocol out of the whitelist), and each chunk the
resampler produces is checked (non-finite samples refused), clipped to [-1, 1], converted to int16
(round(x * 32767)) and appended to the PCM spool file at once, along with the RMS envelope of every
ENVELOPE_FRAME_SAMPLES frame. Memory is a few codec frames plus the envelope (1.4 MB an hour), so a
10-hour upload decodes in the same footprint as a 10-second one. `read_samples` reads a slice back.

Every refusal is a MediaRejected with a stable reason and a client-safe detail. FFmpeg's own error
text is dropped (it can echo the input), as is the exception chain, so nothing leaks through a
traceback that crosses a process boundary.

Cover art (an "attached picture" pseudo video stream in MP3 and M4A) is allowed and never decoded
by us; any other video stream is refused. Subtitle, data and attachment streams are ignored.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import av
import av.error
import numpy as np

from deployments.backends.base import SAMPLE_RATE, SharedPcm
from serve_app.media.errors import MediaRejected
from serve_app.media.sniff import ALLOWED_DEMUXERS
from serve_app.media.spool import SpoolWriter

ENVELOPE_FRAME_SAMPLES = 160  # 10 ms at 16 kHz
_PCM_DTYPE = np.dtype("<i2")  # the spool's PCM: int16 little-endian, mono, SAMPLE_RATE
_PCM_SCALE = 32767  # [-1, 1] maps onto [-32767, 32767]: symmetric, so -1 round-trips too

# FFmpeg guesses MP3 duration from the first frame's bitrate when there is no Xing/LAME header; a
# VBR file can be over-estimated many times over, so its declared duration cannot reject it.
_GUESSED_DURATION_DEMUXERS = frozenset({"mp3"})

# libswresample's default downmix adds channels at -3 dB each, so in-phase stereo comes out louder
# than either channel and loud recordings would clip; capping the matrix sum at 1 averages instead.
_DOWNMIX_OPTIONS = {"rematrix_maxval": "1.0"}


@dataclass(frozen=True)
class DecodeLimits:
    """What one upload may cost to decode."""

    max_decoded_seconds: float = 600.0
    max_channels: int = 8
    max_sample_rate: int = 192_000
    max_wall_seconds: float = 20.0
    # Decoding work, in source samples summed over channels. Output duration alone does not bound
    # CPU: 600 s of 192 kHz 7.1 is 16x the work of 600 s of 48 kHz stereo (an hour of it, silent, is
    # a 1.5 MB FLAC). The default is 600 s of 48 kHz stereo, so 192 kHz 7.1 may last 37.5 s.
    max_source_samples: int = 600 * 48_000 * 2


@dataclass(frozen=True)
class DecodedAudio:
    """Audio ready for an aligner backend (in a spool file), and what it was decoded from."""

    pcm_path: str  # spool file: int16 little-endian mono SAMPLE_RATE; the receiver removes it
    sample_count: int
    envelope: np.ndarray  # float32 RMS (of samples in [-1, 1]) of each ENVELOPE_FRAME_SAMPLES frame, the last partial one included
    container: str  # the FFmpeg demuxer that read it
    codec: str  # FFmpeg codec name, e.g. "aac", "flac", "pcm_s16le"
    source_sample_rate: int  # as the stream header declares it (it may change mid-stream)
    source_channels: int
    # The same samples in Ray's object store, when the scanner shared them (audio aligned as one
    # window): the pipeline hands this to the aligner instead of reading the spool file.
    shared: SharedPcm | None = None

    @property
    def duration_seconds(self) -> float:
        return self.sample_count / SAMPLE_RATE


def container_options(demuxer: str) -> dict[str, str]:
    """FFmpeg options that confine the demuxer to the bytes we hand it."""
    options = {
        # Nested opens (playlist entries, segments, references) go through FFmpeg's protocol
        # layer; an empty whitelist refuses every protocol. Our own bytes arrive as custom I/O.
        "protocol_whitelist": "",
        # Only the forced demuxer may run, including inside any nested open.
        "format_whitelist": demuxer,
    }
    if demuxer == "mov":
        # Off by default; pinned so a changed default can never make FFmpeg open other files.
        options |= {"enable_drefs": "0", "use_absolute_path": "0"}
    if demuxer == "wav":
        options |= WAV_HEADER_ONLY_PROBE
    return options


# The WAV header describes its stream completely (codec, rate, channels, length), yet FFmpeg's
# stream probe reads and parses up to 5 MB of it first: 18 ms for 3 s of 44.1 kHz stereo, 0.7 ms
# without (bench.request_cost's scanner figure). The caps are checked on every decoded frame anyway.
WAV_HEADER_ONLY_PROBE = {"probesize": "32", "analyzeduration": "0"}


def decode_audio(source: BinaryIO, demuxer: str, limits: DecodeLimits, sink: SpoolWriter) -> DecodedAudio:
    """Decode all of `source` (a seekable binary file) with the forced `demuxer` into `sink` as
    SAMPLE_RATE mono int16 PCM, and commit it.

    Raises MediaRejected for anything the client sent that cannot be accepted, leaving `sink`
    uncommitted (the caller's `with` deletes it); raises ValueError only for a programming error (a
    demuxer that is not on the sniffing allow-list).
    """
    if demuxer not in ALLOWED_DEMUXERS:
        raise ValueError(f"demuxer {demuxer!r} is not on the allow-list")
    if source.seek(0, io.SEEK_END) == 0:
        raise _empty()
    source.seek(0)
    deadline = time.monotonic() + limits.max_wall_seconds
    pcm = _PcmWriter(sink)
    try:
        with av.open(
            source,
            mode="r",
            format=demuxer,
            container_options=container_options(demuxer),
            metadata_errors="ignore",  # tags are never used; badly encoded ones must not reject
            timeout=limits.max_wall_seconds,  # FFmpeg's interrupt callback, while opening too
        ) as container:
            stream = _single_audio_stream(container)
            # Read before decoding: the decoder updates them when the format changes mid-stream.
            source_sample_rate, source_channels = stream.sample_rate, stream.channels
            _check_format(source_channels, source_sample_rate, limits)
            _check_declared_duration(stream, demuxer, limits)
            _decode_resampled(container, stream, limits, deadline, pcm)
            codec = stream.codec_context.codec.canonical_name
    except MediaRejected:
        raise
    except _SpoolWriteFailed as failed:
        raise failed.error from None  # our disk, not the client's upload: never a rejection
    except av.error.ExitError:  # the interrupt callback fired: FFmpeg ran past the time limit
        raise _timeout(limits) from None
    except (av.error.FFmpegError, ValueError, OSError, EOFError, RuntimeError):
        raise MediaRejected("undecodable-audio", "the audio could not be decoded") from None

    if not pcm.sample_count:
        raise _empty()
    envelope = pcm.envelope()
    return DecodedAudio(
        pcm_path=sink.commit().path,
        sample_count=pcm.sample_count,
        envelope=envelope,
        container=demuxer,
        codec=codec,
        source_sample_rate=source_sample_rate,
        source_channels=source_channels,
    )


def _single_audio_stream(container: av.container.InputContainer) -> av.AudioStream:
    audio_streams = list(container.streams.audio)
    playable_video = [
        stream
        for stream in container.streams.video
        if not stream.disposition & av.stream.Disposition.attached_pic
    ]
    if len(audio_streams) != 1 or playable_video:
        raise MediaRejected(
            "not-single-audio-stream",
            "the upload must contain exactly one audio stream and no video",
        )
    if audio_streams[0].codec_context is None:  # FFmpeg knows the codec but has no decoder for it
        raise MediaRejected("undecodable-audio", "the audio codec is not supported")
    return audio_streams[0]


def _check_format(channels: int, sample_rate: int, limits: DecodeLimits) -> None:
    if channels > limits.max_channels:
        raise MediaRejected(
            "too-many-channels", f"the audio has more than {limits.max_channels} channels"
        )
    if sample_rate > limits.max_sample_rate:
        raise MediaRejected(
            "sample-rate-too-high", f"the sample rate is above {limits.max_sample_rate} Hz"
        )


def _check_declared_duration(stream: av.AudioStream, demuxer: str, limits: DecodeLimits) -> None:
    """Refuse before decoding when the header itself claims too much audio (or decoding work).

    A header that understates its length gains nothing: decoding counts the real duration.
    """
    if demuxer in _GUESSED_DURATION_DEMUXERS or not stream.duration or not stream.time_base:
        return
    declared_seconds = float(stream.duration * stream.time_base)
    if declared_seconds > limits.max_decoded_seconds:
        raise _too_long(limits)
    if declared_seconds * stream.sample_rate * stream.channels > limits.max_source_samples:
        raise _too_much_work(limits, stream.sample_rate, stream.channels)


def _decode_resampled(
    container: av.container.InputContainer,
    stream: av.AudioStream,
    limits: DecodeLimits,
    deadline: float,
    pcm: _PcmWriter,
) -> None:
    resampler = _MonoResampler()
    decoded_seconds = 0.0
    source_samples = 0
    for frame in _decoded_frames(container, stream, limits, deadline):
        if frame.sample_rate <= 0:
            raise MediaRejected("undecodable-audio", "the audio could not be decoded")
        channels = frame.layout.nb_channels
        _check_format(channels, frame.sample_rate, limits)
        decoded_seconds += frame.samples / frame.sample_rate
        if decoded_seconds > limits.max_decoded_seconds:
            raise _too_long(limits)
        source_samples += frame.samples * channels
        if source_samples > limits.max_source_samples:
            raise _too_much_work(limits, frame.sample_rate, channels)
        for chunk in resampler.push(frame):
            pcm.write(chunk)
    for chunk in resampler.flush():
        pcm.write(chunk)


def _decoded_frames(
    container: av.container.InputContainer,
    stream: av.AudioStream,
    limits: DecodeLimits,
    deadline: float,
) -> Iterator[av.AudioFrame]:
    """Decode packet by packet, checking the clock before each.

    A packet that fails to decode is forgiven only at the very end, where an upload cut off
    mid-frame leaves one. Corruption followed by more audio is refused: skipping it would shift
    every later timestamp.
    """
    corrupt_packet_seen = False
    for packet in container.demux(stream):
        if time.monotonic() > deadline:
            raise _timeout(limits)
        try:
            frames = packet.decode()
        except av.error.InvalidDataError:
            corrupt_packet_seen = True
            continue
        if frames and corrupt_packet_seen:
            raise MediaRejected("undecodable-audio", "the audio is corrupt part-way through")
        yield from frames


class _MonoResampler:
    """Streams frames to SAMPLE_RATE mono float32, starting afresh whenever the input changes.

    PyAV's AudioResampler is fixed to its first frame's format (and, when that already matches the
    output, passes later frames through unconverted), so a mid-stream change needs a new one.
    """

    def __init__(self) -> None:
        self._resampler: av.AudioResampler | None = None
        self._input_format: tuple[str, str, int] | None = None

    def push(self, frame: av.AudioFrame) -> list[np.ndarray]:
        input_format = (frame.format.name, frame.layout.name, frame.sample_rate)
        chunks: list[np.ndarray] = []
        if input_format != self._input_format:
            chunks = self.flush()
            self._resampler = av.AudioResampler(
                format="flt", layout="mono", rate=SAMPLE_RATE, options=_DOWNMIX_OPTIONS
            )
            self._input_format = input_format
        return chunks + _mono_arrays(self._resampler.resample(frame))

    def flush(self) -> list[np.ndarray]:
        return _mono_arrays(self._resampler.resample(None)) if self._resampler else []


def _mono_arrays(frames: list[av.AudioFrame | None]) -> list[np.ndarray]:
    # A passthrough resampler answers a flush with [None].
    return [frame.to_ndarray()[0] for frame in frames if frame is not None and frame.samples]


class _SpoolWriteFailed(Exception):
    def __init__(self, error: OSError):
        super().__init__(error)
        self.error = error


class _PcmWriter:
    """Appends resampled float32 chunks to the sink as int16 PCM, and keeps their RMS envelope."""

    def __init__(self, sink: SpoolWriter):
        self._sink = sink
        self._partial_frame = np.empty(0, dtype=np.float32)  # envelope frames span chunk boundaries
        self._envelope = bytearray()  # float32 values; grows by amortised doubling, not per chunk
        self.sample_count = 0

    def write(self, chunk: np.ndarray) -> None:
        """Refuse non-finite samples, clip resampler overshoot to [-1, 1], convert and append."""
        if not np.isfinite(chunk).all():
            raise MediaRejected("undecodable-audio", "the audio contains invalid (non-finite) samples")
        samples = np.clip(chunk, -1.0, 1.0)  # a new array: the frame's own buffer stays untouched
        try:
            self._sink.write(np.rint(samples * _PCM_SCALE).astype(_PCM_DTYPE))
        except OSError as error:  # kept apart from FFmpeg's OSErrors, which mean a bad upload
            raise _SpoolWriteFailed(error) from None
        self.sample_count += samples.size
        framed = np.concatenate((self._partial_frame, samples))
        whole = framed.size - framed.size % ENVELOPE_FRAME_SAMPLES
        self._envelope += _rms(framed[:whole].reshape(-1, ENVELOPE_FRAME_SAMPLES)).tobytes()
        self._partial_frame = framed[whole:]

    def envelope(self) -> np.ndarray:
        """The envelope, with the last partial frame's RMS."""
        if self._partial_frame.size:
            self._envelope += _rms(self._partial_frame.reshape(1, -1)).tobytes()
            self._partial_frame = self._partial_frame[:0]
        return np.frombuffer(self._envelope, dtype=np.float32).copy()  # one copy, off the growing buffer


def _rms(frames: np.ndarray) -> np.ndarray:
    return np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1)).astype(np.float32)


def read_samples(pcm_path: str, start: int, stop: int) -> np.ndarray:
    """Samples [start, stop) of a decoded PCM spool file as float32 in [-1, 1]; only that slice is
    read. A range outside the file is a ValueError."""
    if not 0 <= start <= stop:
        raise ValueError("need 0 <= start <= stop")
    count = stop - start
    with open(pcm_path, "rb") as pcm:
        pcm.seek(start * _PCM_DTYPE.itemsize)
        data = pcm.read(count * _PCM_DTYPE.itemsize)
    if len(data) != count * _PCM_DTYPE.itemsize:
        raise ValueError(f"samples [{start}, {stop}) run past the end of {pcm_path}")
    return float_samples(np.frombuffer(data, dtype=_PCM_DTYPE))


def read_pcm(pcm_path: str) -> np.ndarray:
    """All of a decoded PCM spool file, as its int16 samples."""
    return np.fromfile(pcm_path, dtype=_PCM_DTYPE)


def float_samples(pcm: np.ndarray) -> np.ndarray:
    """int16 PCM as float32 in [-1, 1] (a new, writable array)."""
    return pcm.astype(np.float32) / np.float32(_PCM_SCALE)


def _empty() -> MediaRejected:
    return MediaRejected("empty-audio", "the upload contains no audio samples")


def _too_much_work(limits: DecodeLimits, sample_rate: int, channels: int) -> MediaRejected:
    allowed_seconds = limits.max_source_samples / (sample_rate * channels)
    return MediaRejected(
        "audio-too-long",
        f"at {sample_rate} Hz and {channels} channels the audio may last at most {allowed_seconds:.1f} s",
    )


def _too_long(limits: DecodeLimits) -> MediaRejected:
    return MediaRejected(
        "audio-too-long", f"decoded audio exceeds the {limits.max_decoded_seconds:g} s limit"
    )


def _timeout(limits: DecodeLimits) -> MediaRejected:
    return MediaRejected(
        "decode-timeout", f"decoding took longer than the {limits.max_wall_seconds:g} s limit"
    )
