"""Decide which FFmpeg demuxer may open an upload, from its leading bytes only.

libmagic looks at the content; the client's filename and Content-Type are never consulted. Anything
outside the allow-list raises MediaRejected("unsupported-media-type"). Magic is only a cheap first
gate (random bytes starting FF FB look like MP3, a WAV with a ZIP appended is still "audio/x-wav"):
the decoder must still confirm there is exactly one audio stream and nothing playable besides.
"""

from __future__ import annotations

import magic

from serve_app.media.errors import MediaRejected

SNIFF_BYTES = 64 * 1024  # holds every container signature; libmagic never needs the whole file

# MIME types as libmagic 5.44 reports them for audio (see reference/security.md), mapped to the
# FFmpeg demuxer forced when decoding. Older libmagic releases say audio/x-flac for FLAC.
DEMUXER_BY_MIME: dict[str, str] = {
    "audio/x-wav": "wav",
    "audio/flac": "flac",
    "audio/x-flac": "flac",
    "audio/mpeg": "mp3",
    "audio/ogg": "ogg",
    # The ISO base media family is one FFmpeg demuxer ("mov,mp4,m4a,3gp,3g2,mj2"); video/* MIME
    # types are allowed because AAC-only .mp4/.3gp/.mov files are labelled video by libmagic.
    "audio/x-m4a": "mov",
    "video/mp4": "mov",
    "video/3gpp": "mov",
    "video/quicktime": "mov",
    "video/webm": "matroska",
    "video/x-matroska": "matroska",
    "audio/x-aiff": "aiff",
}

ALLOWED_DEMUXERS: frozenset[str] = frozenset(DEMUXER_BY_MIME.values())


def sniff_container(head: bytes) -> str:
    """Return the FFmpeg demuxer name for an upload, judged from its first SNIFF_BYTES bytes.

    Raises MediaRejected("unsupported-media-type") for anything not on the allow-list, including
    empty input.
    """
    mime = magic.from_buffer(head[:SNIFF_BYTES], mime=True)
    demuxer = DEMUXER_BY_MIME.get(mime)
    if demuxer is None:
        raise MediaRejected(
            "unsupported-media-type",
            "the upload is not a supported audio format"
            " (WAV, FLAC, MP3, Ogg, M4A/MP4, WebM/Matroska or AIFF)",
        )
    return demuxer
