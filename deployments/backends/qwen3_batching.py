"""Make one batched Qwen3-ForcedAligner call cheaper than the same jobs aligned one by one.

qwen_asr's transformers path batches only the text decoder: the audio encoder runs once per clip, and
padding the batch makes transformers build the decoder's attention mask the slow way. Two changes,
installed on a loaded model by `enable_batched_inference`:

1. One audio-encoder pass for the whole batch (`encode_audio_batch`). The encoder already takes
   several clips at once (their frames concatenated, plus per-clip lengths): qwen_asr's own vLLM
   backend calls it that way. Its transformers path loops per clip "to keep precision" because,
   under SDPA, it ignores the encoder's attention windows, so concatenated clips would attend to
   each other. Clips shorter than one 100-frame chunk (1 s) are still encoded alone: in a batch the
   encoder zero-pads their only chunk to 100 frames, which shifts their last frames slightly, and a
   job's timings must not depend on the jobs batched with it.
2. The "windowed_sdpa" attention implementation (registered with transformers' attention and mask
   interfaces):
   - audio encoder: attention within the windows the encoder marks with `cu_seqlens`
     (`n_window_infer` frames, 8 s), as FlashAttention-2 and vLLM run it. transformers' SDPA ignores
     the windows and lets every frame attend to the whole clip: O(n^2) in clip length, and not how
     the model runs under FA2 or vLLM. Up to one window (8 s) the two are identical.
   - text decoder: transformers' own SDPA attention; only the causal + padding mask is built by
     broadcasting instead of `torch.vmap`, which costs ~5 ms per padded batch on a CPU, a fixed cost
     that only batched calls pay (a lone job has no padding and needs no mask).

tests/test_backend_qwen3.py checks both against upstream's per-clip path on a tiny checkpoint.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

# The encoder's own token arithmetic (13 per 100-frame chunk, three stride-2 convolutions over the rest).
from qwen_asr.core.transformers_backend.modeling_qwen3_asr import _get_feat_extract_output_lengths

if TYPE_CHECKING:
    from qwen_asr.core.transformers_backend.modeling_qwen3_asr import (
        Qwen3ASRForConditionalGeneration,
        Qwen3ASRThinkerForConditionalGeneration,
    )

WINDOWED_SDPA = "windowed_sdpa"


def enable_batched_inference(model: Qwen3ASRForConditionalGeneration) -> None:
    """Switch a loaded model to windowed SDPA attention and one encoder pass per batch."""
    AttentionInterface.register(WINDOWED_SDPA, windowed_sdpa_attention)
    AttentionMaskInterface.register(WINDOWED_SDPA, causal_padding_mask)
    # After loading: from_pretrained(attn_implementation=...) stops at the top-level config, while
    # this sets every sub-model's (thinker, audio encoder, text decoder).
    model.set_attn_implementation(WINDOWED_SDPA)
    # Only now: under plain SDPA, concatenated clips would attend to each other.
    model.thinker.get_audio_features = types.MethodType(encode_audio_batch, model.thinker)


def encode_audio_batch(
    thinker: Qwen3ASRThinkerForConditionalGeneration,
    input_features: torch.Tensor,
    feature_attention_mask: torch.Tensor | None = None,
    audio_feature_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Drop-in for `get_audio_features`: the clips' encodings, concatenated in batch order."""
    encoder = thinker.audio_tower
    frame_counts = feature_attention_mask.sum(-1) if feature_attention_mask is not None else audio_feature_lengths
    clips = [features[:, :frames] for features, frames in zip(input_features, frame_counts)]
    whole_chunk = [index for index, frames in enumerate(frame_counts.tolist()) if frames >= 2 * encoder.n_window]

    encodings: dict[int, torch.Tensor] = {}
    if whole_chunk:
        together = encoder(
            torch.cat([clips[index] for index in whole_chunk], dim=1), feature_lens=frame_counts[whole_chunk]
        ).last_hidden_state
        token_counts = _get_feat_extract_output_lengths(frame_counts[whole_chunk]).tolist()
        encodings.update(zip(whole_chunk, together.split(token_counts)))
    for index, clip in enumerate(clips):
        if index not in encodings:
            encodings[index] = encoder(clip, feature_lens=frame_counts[index : index + 1]).last_hidden_state
    return torch.cat([encodings[index] for index in range(len(clips))], dim=0)


def windowed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except that `cu_seq_lens_q` windows are honoured."""
    windows = kwargs.get("cu_seq_lens_q")
    if windows is None or attention_mask is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    return _attention_within_windows(query, key, value, windows, scaling), None


def _attention_within_windows(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window_bounds: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """(1, heads, tokens, dim) packed windows -> (1, tokens, heads, dim), attention inside each window.

    Windows are gathered into one padded (windows, heads, longest, dim) batch, so one SDPA call does
    them all; padded keys are masked out and padded queries dropped afterwards.
    """
    window_bounds = window_bounds.to(query.device)
    lengths = window_bounds.diff()
    longest = int(lengths.max())
    offsets = torch.arange(longest, device=query.device)
    real = offsets < lengths[:, None]  # (windows, longest)
    positions = (window_bounds[:-1, None] + offsets).clamp(max=query.shape[2] - 1)

    def windowed(states: torch.Tensor) -> torch.Tensor:
        return states[0][:, positions].transpose(0, 1)  # (windows, heads, longest, dim)

    key_mask = None if bool(real.all()) else real[:, None, None, :]
    output = torch.nn.functional.scaled_dot_product_attention(
        windowed(query), windowed(key), windowed(value), attn_mask=key_mask, scale=scaling
    )
    return output.transpose(1, 2)[real].unsqueeze(0)  # real tokens, in packed order


def causal_padding_mask(
    batch_size: int,
    cache_position: torch.Tensor,
    kv_length: int,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """transformers' `sdpa_mask` for the plain causal + padding case, built without torch.vmap."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    plain = mask_function is causal_mask_function and kv_offset == 0
    if not (plain and padded and attention_mask.shape[-1] == kv_length):
        return sdpa_mask(
            batch_size=batch_size,
            cache_position=cache_position,
            kv_length=kv_length,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            **kwargs,
        )
    kv_positions = torch.arange(kv_length, device=cache_position.device)
    causal = kv_positions[None, :] <= cache_position[:, None]  # (queries, keys)
    not_padding = attention_mask.bool()  # (batch, keys)
    return causal[None, None, :, :] & not_padding[:, None, None, :]
