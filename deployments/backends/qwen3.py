"""The Qwen3-ForcedAligner backend: word timings from one batched, non-autoregressive forward pass.

Loading: `model` is a local checkpoint directory or a Hugging Face hub id. A hub id is resolved from
the local Hugging Face cache only (`HF_HOME` / `HF_HUB_CACHE`, read by huggingface_hub): a replica
never downloads weights at start-up. Offline, transformers retries a hub id for ~46 s before it gives
up (measured with DNS failing at once; longer where connections hang); the cache lookup fails at
once instead, and keeps start-up independent of the network. Fetch the weights beforehand (`hf download Qwen/Qwen3-ForcedAligner-0.6B`, a baked image
or a mounted volume). Anything that stops the model loading raises `ModelUnavailable`.

Aligning: `align_batch` makes one batched `align()` call for all the jobs it accepts, on a model
switched to batch its audio encoder too (qwen3_batching.py says how and why). Audio goes in as
`(float32 array, 16000)` tuples, never as strings: qwen_asr reads strings as file paths or URLs.
Per-job outcomes, never a failed batch:
- audio longer than `max_audio_seconds` -> AlignmentFailed("audio-too-long"). We reject rather than
  chunk: splitting the transcript across chunks needs to know where the words fall, which is the
  answer we are computing. The timestamp head addresses 400 s; the model is reliable to ~180-300 s.
- audio shorter than one 80 ms timestamp step -> AlignmentFailed("audio-too-short"). Such clips hold
  no timed unit, and below 200 samples the feature extractor fails alone but not when padded in a
  batch, so accepting them would make results depend on batching.
- no unit survives qwen_asr's text cleaning -> AlignmentFailed("no-alignment-found").
- the batched call raises -> every job is retried alone, so one bad job fails alone with
  `BackendFailed` (our failure: 500, or 503 for CUDA out of memory, whose retry in a smaller batch
  may succeed) and the others still get their timings.
Timings are passed on as the model gives them (80 ms grid, not clamped to the audio length): the
ingress clamps and maps units back to the caller's words. qwen_asr may re-split units (Japanese,
Korean), so the count can differ from `len(job.units)`; the order is the spoken order.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from deployments.backends.base import (
    SAMPLE_RATE,
    AlignmentFailed,
    AlignmentJob,
    BackendFailed,
    BackendInfo,
    JobOutcome,
    UnitTiming,
)
from serve_app.text.languages import LANGUAGES

if TYPE_CHECKING:
    from qwen_asr import Qwen3ForcedAligner
    from qwen_asr.inference.qwen3_forced_aligner import ForcedAlignResult

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")
_TIMESTAMP_STEP_SECONDS = 0.08  # the model's time grid; also the shortest audio we accept
_MIN_AUDIO_SAMPLES = round(_TIMESTAMP_STEP_SECONDS * SAMPLE_RATE)


class ModelUnavailable(RuntimeError):
    """The aligner model could not be loaded (missing weights, bad checkpoint, no such device)."""


class Qwen3Backend:
    """An `AlignerBackend` serving Qwen3-ForcedAligner through the `qwen_asr` package."""

    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        device: str = "cpu",
        max_audio_seconds: float = 180.0,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
        if not _DEVICE_PATTERN.fullmatch(device):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {device!r}")
        if max_audio_seconds <= 0:
            raise ValueError("max_audio_seconds must be positive")

        self._aligner = _load_aligner(model, dtype, device)
        self.timestamp_horizon_seconds = _timestamp_horizon_seconds(self._aligner)
        if max_audio_seconds > self.timestamp_horizon_seconds:
            raise ValueError(
                f"max_audio_seconds {max_audio_seconds:g} exceeds the {self.timestamp_horizon_seconds:g} s "
                "the model's timestamp head can address"
            )
        self.info = BackendInfo(
            name="qwen3",
            model=model,
            languages=frozenset(LANGUAGES),
            max_audio_seconds=max_audio_seconds,
        )

    def align_batch(self, jobs: Sequence[AlignmentJob]) -> list[JobOutcome]:
        rejections = [self._reject(job) for job in jobs]
        accepted = [job for job, rejection in zip(jobs, rejections) if rejection is None]
        aligned = iter(self._align_accepted(accepted))
        return [next(aligned) if rejection is None else rejection for rejection in rejections]

    def _reject(self, job: AlignmentJob) -> AlignmentFailed | None:
        """Why this job is not sent to the model, or None when it is."""
        audio_seconds = job.audio.shape[0] / SAMPLE_RATE
        if audio_seconds > self.info.max_audio_seconds:
            return AlignmentFailed(
                "audio-too-long",
                f"{audio_seconds:.1f} s of audio is longer than the {self.info.max_audio_seconds:g} s "
                "this aligner accepts in one request",
            )
        if job.audio.shape[0] < _MIN_AUDIO_SAMPLES:
            return AlignmentFailed(
                "audio-too-short",
                f"audio shorter than {_TIMESTAMP_STEP_SECONDS * 1000:.0f} ms cannot be aligned",
            )
        return None

    def _align_accepted(self, jobs: list[AlignmentJob]) -> list[JobOutcome]:
        if not jobs:
            return []
        try:
            return [_timings(result) for result in self._call_model(jobs)]
        except Exception as error:  # any model failure: isolate the job(s) that caused it
            if len(jobs) == 1:
                return [_model_failure(error)]
            logger.warning(
                "batched alignment of %d jobs failed (%s); retrying each alone", len(jobs), type(error).__name__
            )
            return [self._align_alone(job) for job in jobs]

    def _align_alone(self, job: AlignmentJob) -> JobOutcome:
        try:
            return _timings(self._call_model([job])[0])
        except Exception as error:
            return _model_failure(error)

    def _call_model(self, jobs: list[AlignmentJob]) -> list[ForcedAlignResult]:
        import torch

        # qwen_asr's align() runs the forward pass with autograd on; serving never needs gradients.
        with torch.inference_mode():
            return self._aligner.align(
                audio=[(np.ascontiguousarray(job.audio, dtype=np.float32), SAMPLE_RATE) for job in jobs],
                text=[" ".join(job.units) for job in jobs],
                language=[job.language for job in jobs],
            )


def _load_aligner(model: str, dtype: str, device: str) -> Qwen3ForcedAligner:
    checkpoint = _local_checkpoint(model)
    started = time.monotonic()
    import torch  # heavy imports (~14 s with qwen_asr) only once a backend is actually built
    from qwen_asr import Qwen3ForcedAligner

    from deployments.backends.qwen3_batching import enable_batched_inference

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelUnavailable(f"device {device!r} requested but no CUDA device is visible")
    try:
        aligner = Qwen3ForcedAligner.from_pretrained(
            checkpoint,
            dtype=dtype if dtype == "auto" else getattr(torch, dtype),
            device_map=device,
            local_files_only=True,
        )
    except Exception as error:  # transformers raises OSError, ValueError, KeyError, RuntimeError...
        raise ModelUnavailable(f"could not load aligner model {model!r}: {type(error).__name__}") from error
    enable_batched_inference(aligner.model)
    logger.info("loaded aligner model %r on %s in %.1f s", model, device, time.monotonic() - started)
    return aligner


def _local_checkpoint(model: str) -> str:
    """The directory holding `model`: itself, or a hub id's snapshot in the local HF cache."""
    if Path(model).is_dir():
        return model
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=model, local_files_only=True)
    except Exception as error:  # HFValidationError (not an id), LocalEntryNotFoundError (not cached)
        raise ModelUnavailable(
            f"aligner model {model!r} is neither a local directory nor in the Hugging Face cache; "
            "download it before starting the service"
        ) from error


def _timestamp_horizon_seconds(aligner: Qwen3ForcedAligner) -> float:
    # The head's real width, not the config's claim: a checkpoint whose thinker model_type was
    # lost on save reloads with a vocabulary-sized head and would otherwise look valid.
    classes = aligner.model.thinker.lm_head.out_features
    return classes * aligner.timestamp_segment_time / 1000


def _timings(result: ForcedAlignResult) -> list[UnitTiming] | AlignmentFailed:
    timings = [UnitTiming(item.text, float(item.start_time), float(item.end_time)) for item in result]
    if not timings:
        return AlignmentFailed("no-alignment-found", "no transcript unit could be aligned")
    return timings


def _model_failure(error: Exception) -> BackendFailed:
    # The type is enough to diagnose; messages can echo input and stay out of logs and responses.
    logger.warning("alignment failed for one job: %s", type(error).__name__)
    return BackendFailed.from_error(error)
