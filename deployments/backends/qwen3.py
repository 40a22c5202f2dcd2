"""The Qwen3-ForcedAligner backend: word timings from one batched, non-autoregressive forward pass.

Loading: `model` is a local checkpoint directory or a Hugging Face hub id. A hub id is resolved from
the local Hugging Face cache only (`HF_HOME` / `HF_HUB_CACHE`, read by huggingface_hub): a replica
never downloads weights at start-up. Offline, transformers retries a hub id for ~46 s before it gives
up (measured with DNS failing at once; longer where connections hang); the cache lookup fails at
once instead, and keeps start-up independent of the network. Fetch the weights beforehand (`hf download Qwen/Qwen3-ForcedAligner-0.6B`, a baked image
or a mounted volume). Anything that stops the model loading raises `ModelUnavailable`.

Aligning: `align_batch` runs qwen_asr's `align()` step by step itself (same text splitting, prompt,
processor and batched thinker forward, on a model switched to batch its audio encoder too:
qwen3_batching.py says how and why), so that the timestamp slots' logits are at hand. Audio goes in
as `(float32 array, 16000)` tuples, never as strings: qwen_asr reads strings as file paths or URLs.

Confidence: the timestamp head is a softmax over 80 ms steps. A slot's confidence is the probability
mass within one step of its argmax step (the probability that the time is right to within 80 ms;
`_slot_readings` says why not the argmax's own probability); a unit's is the lower of its start's and
end's, to two decimals. Not yet calibrated against real weights (none can be downloaded here).

Implausible times: instead of upstream's `fix_timestamp`, which silently overwrites out-of-order
times, qwen3_repair.py finds the raw times that cannot be right (zero length, shared starts, a pile-up
at the end of the audio, out of order, beyond the audio), re-aligns each such span alone on its own
stretch of audio (one more batched call for all jobs: one round, at most 8 spans a job) and flags
the result `repaired`; what is still implausible is interpolated between its neighbours, flagged
`interpolated`, with confidence 0.0. Every time returned lies within [0, duration], in order. Last,
`speech_edges.keep_out_of_silence` takes word edges out of silence (the 80 ms grid puts them there).

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
- the repair call raises -> each job's windows are retried alone; a job whose repair still fails has
  those spans interpolated. A repair never fails a job.
qwen_asr may re-split units (Japanese, Korean), so the count can differ from `len(job.units)`; the
order is the spoken order. The ingress maps units back to the caller's words.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

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
from deployments.backends.qwen3_repair import RawAlignment, RepairPlan, plan_repair, repaired_timings
from deployments.backends.speech_edges import keep_out_of_silence
from serve_app.text.languages import LANGUAGES

if TYPE_CHECKING:
    import torch
    from qwen_asr import Qwen3ForcedAligner

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")
_TIMESTAMP_STEP_SECONDS = 0.08  # the model's time grid; also the shortest audio we accept
_MIN_AUDIO_SAMPLES = round(_TIMESTAMP_STEP_SECONDS * SAMPLE_RATE)

_Request = tuple[np.ndarray, tuple[str, ...]]  # audio and its units, for one row of a forward pass
_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


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
        self._step_seconds = self._aligner.timestamp_segment_time / 1000
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
        return _batched_else_alone(self._align_jobs, jobs, lambda job, error: _model_failure(error))

    def _align_jobs(self, jobs: list[AlignmentJob]) -> list[JobOutcome]:
        """The first pass for every job with units, then one repair pass for all their implausible spans."""
        words = [self._words(job) for job in jobs]
        aligned = [(job, units) for job, units in zip(jobs, words) if units]
        raws = self._forward([(job.audio, units) for job, units in aligned])
        timings = iter(self._repaired([job for job, _ in aligned], raws))
        return [next(timings) if units else _no_alignment() for units in words]

    def _words(self, job: AlignmentJob) -> tuple[str, ...]:
        """The units as qwen_asr cleans and splits them (Japanese and Korean are re-split)."""
        words, _ = self._aligner.aligner_processor.encode_timestamp(" ".join(job.units), job.language)
        return tuple(words)

    def _repaired(self, jobs: list[AlignmentJob], raws: list[RawAlignment]) -> list[list[UnitTiming]]:
        durations = [job.audio.shape[0] / SAMPLE_RATE for job in jobs]
        plans = [plan_repair(raw.bounds, duration, self._step_seconds) for raw, duration in zip(raws, durations)]
        requests = [_window_requests(job.audio, raw, plan) for job, raw, plan in zip(jobs, raws, plans)]
        realigned = _batched_else_alone(self._forward_groups, requests, _repair_failed)
        return [
            keep_out_of_silence(job.audio, repaired_timings(raw, duration, self._step_seconds, plan, answers))
            for job, raw, duration, plan, answers in zip(jobs, raws, durations, plans, realigned)
        ]

    def _forward_groups(self, groups: list[list[_Request]]) -> list[list[RawAlignment]]:
        """`_forward` over every group's requests at once, answers regrouped."""
        answers = iter(self._forward([request for group in groups for request in group]))
        return [[next(answers) for _ in group] for group in groups]

    def _forward(self, requests: list[_Request]) -> list[RawAlignment]:
        """One batched forward pass, as qwen_asr's align() makes it, keeping each timestamp's confidence.

        Same processor calls and prompt, same thinker forward and argmax as align(); only the
        timestamp slots' logits are read, and only their steps and confidences leave the device.
        """
        if not requests:
            return []
        import torch
        from qwen_asr.inference.utils import normalize_audios

        aligner = self._aligner
        audios = normalize_audios(
            [(np.ascontiguousarray(audio, dtype=np.float32), SAMPLE_RATE) for audio, _ in requests]
        )
        inputs = aligner.processor(
            text=[_prompt(words) for _, words in requests], audio=audios, return_tensors="pt", padding=True
        )
        inputs = inputs.to(aligner.model.device).to(aligner.model.dtype)
        # align() runs the forward pass with autograd on; serving never needs gradients.
        with torch.inference_mode():
            logits = aligner.model.thinker(**inputs).logits
            return [
                self._raw_alignment(words, row_logits[row_ids == aligner.timestamp_token_id])
                for (_, words), row_ids, row_logits in zip(requests, inputs["input_ids"], logits)
            ]

    def _raw_alignment(self, words: tuple[str, ...], slot_logits: torch.Tensor) -> RawAlignment:
        steps, slot_confidences = _slot_readings(slot_logits)
        # align()'s arithmetic: step x segment ms, then seconds to the millisecond.
        times = [round(step * self._aligner.timestamp_segment_time / 1000, 3) for step in steps]
        units = range(len(words))  # two slots per word; indexing raises if the model gave fewer
        return RawAlignment(
            words=words,
            bounds=tuple((times[2 * unit], times[2 * unit + 1]) for unit in units),
            # A unit is as trustworthy as its weaker boundary; two decimals, because batch padding
            # moves the probabilities in their last bits (<= 2e-4 measured on the tiny checkpoint).
            confidences=tuple(
                round(min(slot_confidences[2 * unit], slot_confidences[2 * unit + 1]), 2) for unit in units
            ),
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


_AUDIO_PROMPT = "<|audio_start|><|audio_pad|><|audio_end|>"
_SLOTS = "<timestamp><timestamp>"  # a unit's start and end slots


def _prompt(words: Sequence[str]) -> str:
    """encode_timestamp's model input for units already split (a window's units must not be re-split)."""
    return _AUDIO_PROMPT + _SLOTS.join(words) + _SLOTS


def _slot_readings(slot_logits: torch.Tensor) -> tuple[list[int], list[float]]:
    """Each timestamp slot's argmax step, and the probability that its time is within one step of it.

    Not the argmax class's own probability: the classes are ordered 80 ms steps, and a head split
    between two adjacent steps is sure of the boundary to within a step; what measures doubt is
    probability spread further away. The softmax runs over the slots' rows only, in float32.
    """
    logits = slot_logits.float()
    steps = logits.argmax(dim=-1)
    neighbours = steps[:, None] + steps.new_tensor([-1, 0, 1])
    real = (neighbours >= 0) & (neighbours < logits.shape[-1])  # the first and last step have one neighbour
    near = logits.gather(-1, neighbours.clamp(0, logits.shape[-1] - 1)).masked_fill(~real, float("-inf"))
    confidences = (near.logsumexp(dim=-1) - logits.logsumexp(dim=-1)).exp().clamp(max=1.0)
    return steps.tolist(), confidences.tolist()


def _window_requests(audio: np.ndarray, raw: RawAlignment, plan: RepairPlan) -> list[_Request]:
    """Each window's stretch of audio and its span's units, as split by the first pass."""
    # Window bounds are whole milliseconds, so whole samples: the offset back is exact.
    return [
        (
            audio[round(window.start * SAMPLE_RATE) : round(window.end * SAMPLE_RATE)],
            raw.words[window.units.start : window.units.stop],
        )
        for window in plan.windows
    ]


def _batched_else_alone(
    run: Callable[[list[_Item]], list[_Result]],
    items: list[_Item],
    failed: Callable[[_Item, Exception], _Result],
) -> list[_Result]:
    """`run(items)`; if it raises, each item (one job's work) alone, so that a bad one fails alone."""
    try:
        return run(items)
    except Exception as error:  # any model failure: isolate the job(s) that caused it
        if len(items) == 1:
            return [failed(items[0], error)]
        logger.warning(
            "a batched model call for %d jobs failed (%s); retrying each alone", len(items), type(error).__name__
        )
    results = []
    for item in items:
        try:
            results.append(run([item])[0])
        except Exception as error:
            results.append(failed(item, error))
    return results


def _repair_failed(windows: list[_Request], error: Exception) -> list[None]:
    # A repair is an improvement, never a reason to fail the job: its spans are interpolated.
    logger.warning(
        "re-aligning %d implausible spans failed (%s); interpolating them", len(windows), type(error).__name__
    )
    return [None] * len(windows)


def _no_alignment() -> AlignmentFailed:
    return AlignmentFailed("no-alignment-found", "no transcript unit could be aligned")


def _model_failure(error: Exception) -> BackendFailed:
    # The type is enough to diagnose; messages can echo input and stay out of logs and responses.
    logger.warning("alignment failed for one job: %s", type(error).__name__)
    return BackendFailed.from_error(error)
