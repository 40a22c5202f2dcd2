"""Backend selection: `qwen3`, `pocketsphinx`, or `auto` (qwen3 when its weights load).

`qwen3` pinned: a model that cannot load fails the replica's start, so a GPU deploy never serves
from a fallback by accident. `auto`: the failure is logged loudly and PocketSphinx serves instead;
the chosen backend shows in /v1/ready and in every response.
"""

from __future__ import annotations

import logging

from deployments.backends.base import AlignerBackend
from serve_app.settings import GraphArgs

logger = logging.getLogger("ray.serve")


def load_backend(args: GraphArgs) -> AlignerBackend:
    # Imported here: each backend pulls heavy libraries (torch/transformers, pocketsphinx).
    if args.backend == "pocketsphinx":
        from deployments.backends.pocketsphinx import PocketSphinxBackend

        return PocketSphinxBackend()

    from deployments.backends.qwen3 import ModelUnavailable, Qwen3Backend

    try:
        return Qwen3Backend(
            args.qwen3_model,
            dtype=args.qwen3_dtype,
            device=args.qwen3_device,
            max_audio_seconds=args.qwen3_max_audio_seconds,
        )
    except ModelUnavailable as error:
        if args.backend == "qwen3":
            raise
        from deployments.backends.pocketsphinx import PocketSphinxBackend

        logger.warning(
            "!!! backend=auto: Qwen3-ForcedAligner could not be loaded from %r (%s); "
            "FALLING BACK to the offline PocketSphinx aligner (English only, lower accuracy) !!!",
            args.qwen3_model,
            error,
        )
        return PocketSphinxBackend()
