"""The scanner's whole check of one upload, in order: clamd -> libmagic sniff -> capped decode.

clamd runs first, on every byte of the upload: malware is identified as malware whatever it
claims to be (and counted as such by abuse detection), and signatures for decoder exploits see a
file before FFmpeg parses it. Then the container is sniffed, then decoded within the caps.

The upload is a spool file, read in chunks by each step (clamd's stream, the sniffer's few reads,
FFmpeg's I/O); the decoded PCM goes to a new spool file. On a Rejection or ScanUnavailable no PCM
file remains; on acceptance the DecodedAudio's pcm_path is the caller's to remove. The upload file
is never deleted here: the caller that owns it removes it, whatever the verdict.

The verdict is a value, never an exception, so it crosses the Serve hop intact:
- `DecodedAudio`: accepted;
- `Rejection`: the client's upload is refused (a problem slug, a client-safe detail, and for
  malware the signature name, which goes to the audit log and never to the client);
- `ScanUnavailable`: clamd could not give a verdict, so the upload is refused with 503 (fail closed).
"""

from __future__ import annotations

from dataclasses import dataclass

from serve_app.media.clamav import ClamdScanner, ScannerUnavailable
from serve_app.media.decode import DecodedAudio, DecodeLimits, decode_audio
from serve_app.media.errors import MediaRejected
from serve_app.media.sniff import sniff_container
from serve_app.media.spool import Spool, SpooledFile
from serve_app.settings import ScannerOptions


@dataclass(frozen=True)
class Rejection:
    reason: str  # a problem slug (serve_app.problems)
    detail: str  # safe to show the client
    signature: str | None = None  # malware only: for the audit log, never the client


@dataclass(frozen=True)
class ScanUnavailable:
    reason: str  # ScannerUnavailable's reason code


Verdict = DecodedAudio | Rejection | ScanUnavailable


_MIN_DECODE_WALL_SECONDS = 10.0  # a short request's scaled wall-time cap never drops below this


def decode_limits(options: ScannerOptions, admitted_seconds: float) -> DecodeLimits:
    """The decode caps for a request that may hold `admitted_seconds` of audio.

    The options describe the longest request (`max_decoded_seconds`); wall time and decoding work
    scale down with the share of it this request may use, so a 30 min request cannot spend the
    decoding budget of a 10 h one.
    """
    seconds = min(admitted_seconds, options.max_decoded_seconds)
    share = seconds / options.max_decoded_seconds
    return DecodeLimits(
        max_decoded_seconds=seconds,
        max_channels=options.max_channels,
        max_sample_rate=options.max_sample_rate,
        max_wall_seconds=max(options.max_decode_wall_seconds * share, min(options.max_decode_wall_seconds, _MIN_DECODE_WALL_SECONDS)),
        max_source_samples=max(round(options.max_source_samples * share), 1),
    )


def inspect_upload(upload: SpooledFile, clamd: ClamdScanner, limits: DecodeLimits, spool: Spool) -> Verdict:
    """Scan, sniff and decode the upload file into a PCM spool file. Blocks: run it in a thread."""
    with open(upload.path, "rb") as source:
        try:
            scanned = clamd.scan(source)
        except ScannerUnavailable as unavailable:
            return ScanUnavailable(unavailable.reason)
        if scanned.infected:
            return Rejection("malware-detected", "the upload was refused by the malware scanner", signature=scanned.signature)
        try:
            demuxer = sniff_container(source)
            with spool.writer("pcm") as sink:  # deleted unless decode_audio commits it
                return decode_audio(source, demuxer, limits, sink)
        except MediaRejected as rejected:
            return Rejection(rejected.reason, rejected.detail)
