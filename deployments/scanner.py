"""Scanner deployment: the isolation boundary for everything that parses untrusted bytes.

It sniffs the container with libmagic and decodes with hard caps to 16 kHz mono float32, in its own
CPU replicas, so a decoder blow-up costs a scanner replica (which Serve replaces), never the ingress
or an aligner. It answers with a verdict, never with an exception for bad input: a `DecodedAudio`
when the upload is accepted, a `Rejection` (a problem slug and a client-safe sentence) otherwise.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
from ray import serve

from serve_app.media import DecodedAudio, DecodeLimits, MediaRejected, decode_audio, sniff_container
from serve_app.settings import ScannerOptions

SNIFF_BYTES = 64 * 1024  # libmagic needs only the leading bytes


@dataclass(frozen=True)
class Rejection:
    reason: str  # a problem slug (serve_app.api.problems)
    detail: str  # safe to show the client


@serve.deployment(
    name="Scanner",
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=4,
    max_queued_requests=32,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2},
    user_config=ScannerOptions().model_dump(),
)
class Scanner:
    def reconfigure(self, user_config: dict) -> None:
        # Serve always calls this before the first request (user_config has a default above).
        options = ScannerOptions.model_validate(user_config)
        self._limits = DecodeLimits(
            max_decoded_seconds=options.max_decoded_seconds,
            max_channels=options.max_channels,
            max_sample_rate=options.max_sample_rate,
            max_wall_seconds=options.max_decode_wall_seconds,
        )

    async def inspect(self, upload: np.ndarray) -> DecodedAudio | Rejection:
        """Sniff and decode one upload (uint8 array). Runs in a worker thread: decoding blocks."""
        return await asyncio.to_thread(self._inspect, upload.tobytes())

    def _inspect(self, data: bytes) -> DecodedAudio | Rejection:
        limits = self._limits  # read once: reconfigure() may swap it mid-request
        try:
            demuxer = sniff_container(data[:SNIFF_BYTES])
            return decode_audio(data, demuxer, limits)
        except MediaRejected as rejected:
            return Rejection(rejected.reason, rejected.detail)

    async def ready(self) -> bool:
        return True
