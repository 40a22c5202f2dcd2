"""Decide which FFmpeg demuxer may open an upload, from the first bytes of its audio.

libmagic looks at the content; the client's filename and Content-Type are never consulted. Anything
outside the allow-list raises MediaRejected("unsupported-media-type"). Magic is only a cheap first
gate (random bytes starting FF FB look like MP3, a WAV with a ZIP appended is still "audio/x-wav"):
the decoder must still confirm there is exactly one audio stream and nothing playable besides.

Leading metadata: ID3v2 tags (cover art makes them hundreds of kB, as podcast and audiobook tools
write them) stand before the audio, where libmagic would see only the tag. They are skipped by
their declared size, tag after tag, and the audio behind them is sniffed. The skipping is strict:
a tag whose size is malformed or runs past the upload, more than MAX_LEADING_TAGS tags, or a tag
followed by anything but MPEG audio or FLAC is refused, and skipping never reads past the upload
itself (which the ingress has already capped). The upload is a seekable file: skipping reads each
tag's 10-byte header and seeks past its body, so a 20 MB tag costs two small reads, never the tag. The other containers need no skipping, because
libmagic names them from their first bytes whatever metadata follows: RIFF/WAVE from "RIFF....WAVE"
(LIST or bext chunks before `fmt ` do not matter), FLAC from "fLaC" (PICTURE blocks follow it) and
MP4/M4A from the leading `ftyp` box (`moov` after `mdat`, big `free` or cover art in `udta` do
not matter); tests/test_media.py checks each of these shapes.
"""

from __future__ import annotations

import io
from typing import BinaryIO

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

# ID3v2 is MPEG audio's tag; some taggers also put it in front of FLAC. FFmpeg skips leading ID3v2
# tags itself when it opens a stream, whichever demuxer is forced.
DEMUXERS_AFTER_ID3V2: frozenset[str] = frozenset({"mp3", "flac"})
MAX_LEADING_TAGS = 8  # real files carry one, sometimes two (an old tag left behind)

_ID3V2_MAGIC = b"ID3"
_ID3V2_HEADER_BYTES = 10  # and as many again for a v2.4 footer
_ID3V2_FOOTER_FLAG = 0x10
_ID3V2_VERSIONS = frozenset({2, 3, 4})


def sniff_container(upload: BinaryIO) -> str:
    """Return the FFmpeg demuxer name for an upload (a seekable binary file, read from its start),
    judged from the first bytes of its audio. The file's position afterwards is unspecified.

    Raises MediaRejected("unsupported-media-type") for anything not on the allow-list, including
    empty input and malformed or overlong leading ID3v2 tags.
    """
    size = upload.seek(0, io.SEEK_END)
    audio_start = _end_of_leading_id3v2_tags(upload, size)
    upload.seek(audio_start)
    mime = magic.from_buffer(upload.read(SNIFF_BYTES), mime=True)
    demuxer = DEMUXER_BY_MIME.get(mime)
    if demuxer is None or (audio_start and demuxer not in DEMUXERS_AFTER_ID3V2):
        raise MediaRejected(
            "unsupported-media-type",
            "the upload is not a supported audio format"
            " (WAV, FLAC, MP3, Ogg, M4A/MP4, WebM/Matroska or AIFF)",
        )
    return demuxer


def _end_of_leading_id3v2_tags(upload: BinaryIO, size: int) -> int:
    """The offset just past the ID3v2 tags the upload (of `size` bytes) starts with (0 when none)."""
    position = 0
    for _ in range(MAX_LEADING_TAGS):
        header = _header_at(upload, position)
        if not header.startswith(_ID3V2_MAGIC):
            return position
        position += _id3v2_tag_length(header)
        if position > size:
            raise _bad_tag("an ID3v2 tag declares more bytes than the upload holds")
    if _header_at(upload, position).startswith(_ID3V2_MAGIC):
        raise _bad_tag(f"the upload starts with more than {MAX_LEADING_TAGS} ID3v2 tags")
    return position


def _header_at(upload: BinaryIO, position: int) -> bytes:
    upload.seek(position)
    return upload.read(_ID3V2_HEADER_BYTES)


def _id3v2_tag_length(header: bytes) -> int:
    """Header, body and footer bytes of the tag whose 10-byte header this is (ID3v2.4 section 3.1)."""
    if len(header) < _ID3V2_HEADER_BYTES:
        raise _bad_tag("an ID3v2 tag declares more bytes than the upload holds")
    major, revision, flags, size = header[3], header[4], header[5], header[6:10]
    if major not in _ID3V2_VERSIONS or revision == 0xFF or any(byte & 0x80 for byte in size):
        raise _bad_tag("the upload starts with a malformed ID3v2 tag header")
    body = (size[0] << 21) | (size[1] << 14) | (size[2] << 7) | size[3]  # syncsafe: 7 bits a byte
    footer = _ID3V2_HEADER_BYTES if major == 4 and flags & _ID3V2_FOOTER_FLAG else 0
    return _ID3V2_HEADER_BYTES + body + footer


def _bad_tag(detail: str) -> MediaRejected:
    return MediaRejected("unsupported-media-type", detail)
