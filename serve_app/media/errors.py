"""The one exception the media checks raise for uploads they refuse.

`reason` is a stable machine code the ingress maps to a problem type; `detail` is a sentence that is
safe to show the client (never FFmpeg's own message, which can echo the input, never a traceback).
"""

from __future__ import annotations

from typing import Literal

RejectionReason = Literal[
    "unsupported-media-type",
    "undecodable-audio",
    "empty-audio",
    "audio-too-long",
    "too-many-channels",
    "sample-rate-too-high",
    "not-single-audio-stream",
    "decode-timeout",
]


class MediaRejected(Exception):
    """An upload was refused by sniffing or decoding; the client's fault, not the server's."""

    def __init__(self, reason: RejectionReason, detail: str):
        # Both go to Exception.args so the exception pickles (it crosses Ray process boundaries).
        super().__init__(reason, detail)
        self.reason: RejectionReason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"
