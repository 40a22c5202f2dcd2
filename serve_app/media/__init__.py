"""Untrusted media handling for the scanner: sniff the container, then decode within limits into
the spool (uploads and decoded PCM live in spool files, never whole in a process's memory)."""

from serve_app.media.decode import ENVELOPE_FRAME_SAMPLES, DecodedAudio, DecodeLimits, decode_audio, read_samples
from serve_app.media.errors import MediaRejected, RejectionReason
from serve_app.media.sniff import ALLOWED_DEMUXERS, sniff_container
from serve_app.media.spool import Spool, SpooledFile, SpoolWriter

__all__ = [
    "ALLOWED_DEMUXERS",
    "ENVELOPE_FRAME_SAMPLES",
    "DecodeLimits",
    "DecodedAudio",
    "MediaRejected",
    "RejectionReason",
    "Spool",
    "SpoolWriter",
    "SpooledFile",
    "decode_audio",
    "read_samples",
    "sniff_container",
]
