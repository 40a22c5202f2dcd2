"""Untrusted media handling for the scanner: sniff the container, then decode within limits."""

from serve_app.media.decode import DecodedAudio, DecodeLimits, decode_audio
from serve_app.media.errors import MediaRejected, RejectionReason
from serve_app.media.sniff import ALLOWED_DEMUXERS, sniff_container

__all__ = [
    "ALLOWED_DEMUXERS",
    "DecodeLimits",
    "DecodedAudio",
    "MediaRejected",
    "RejectionReason",
    "decode_audio",
    "sniff_container",
]
