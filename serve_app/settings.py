"""The single source of configuration, in three typed parts.

- `GraphArgs`: the builder's arguments (`applications[].args` in configs/serve.yaml). Structure that
  needs a redeploy to change: which aligner backend, which model, on which device.
- `IngressOptions`, `ScannerOptions`, `AlignerOptions`: each deployment's `user_config`. Live knobs
  (caps, batch size) applied by `reconfigure()` without restarting replicas.
- Secrets come from the process environment only (added with authentication); never from the YAML.

Every model forbids unknown keys, so a typo in the YAML fails the deploy instead of silently
falling back to a default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_app.api.languages import canonical_language


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GraphArgs(_Strict):
    """Builder arguments: the shape of the graph and the model behind it."""

    backend: Literal["auto", "qwen3", "pocketsphinx"] = Field(
        "auto",
        description="qwen3: must load or the deploy fails. pocketsphinx: offline English. "
        "auto: qwen3 when its weights load, otherwise pocketsphinx (logged loudly).",
    )
    qwen3_model: str = Field("Qwen/Qwen3-ForcedAligner-0.6B", description="Hub id or local directory.")
    qwen3_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    qwen3_device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    qwen3_max_audio_seconds: float = Field(
        180.0, gt=0, le=300, description="Longer audio is rejected (the model is unreliable past ~300 s)."
    )


class IngressOptions(_Strict):
    """Live knobs of the ingress: what a request may contain and how long we wait downstream."""

    max_upload_bytes: int = Field(25 * 1024 * 1024, gt=0, description="Whole multipart body.")
    max_transcript_chars: int = Field(20_000, gt=0)
    max_transcript_units: int = Field(5_000, gt=0, description="Alignment units (words, CJK characters).")
    default_language: str = Field("English", description="Used when a request names no language.")
    scan_timeout_s: float = Field(30.0, gt=0)
    align_timeout_s: float = Field(120.0, gt=0)
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent with 503 answers.")

    @field_validator("default_language")
    @classmethod
    def _known_language(cls, value: str) -> str:
        canonical = canonical_language(value)
        if canonical is None:
            raise ValueError(f"unsupported default_language {value!r}")
        return canonical


class ScannerOptions(_Strict):
    """Live knobs of the scanner: the hard caps applied while decoding untrusted audio."""

    max_decoded_seconds: float = Field(600.0, gt=0)
    max_channels: int = Field(8, ge=1, le=64)
    max_sample_rate: int = Field(192_000, ge=8_000)
    max_decode_wall_seconds: float = Field(20.0, gt=0)


class AlignerOptions(_Strict):
    """Live knobs of the aligner: how requests are grouped into batches."""

    max_batch_size: int = Field(8, ge=1, le=64)
    batch_wait_timeout_s: float = Field(0.05, ge=0, le=5)

