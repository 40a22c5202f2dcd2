"""The batched Qwen3 path (deployments/backends/qwen3_batching.py) against upstream's own code.

Each piece is compared with what it replaces: windowed attention with SDPA under a dense
block-diagonal mask, the broadcast causal mask with transformers' vmap-built one, and one batched
encoder pass with qwen_asr's per-clip loop, on the tiny random checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from qwen_asr import Qwen3ForcedAligner
from transformers.masking_utils import sdpa_mask

from deployments.backends.qwen3_batching import (
    _attention_within_windows,
    causal_padding_mask,
    enable_batched_inference,
)

FRAMES_PER_SECOND = 100  # mel frames
WINDOW_FRAMES = 800  # the tiny checkpoint's n_window_infer, as in the real model (8 s)


def block_diagonal_attention(query, key, value, window_bounds, scaling):
    """The reference: SDPA over all tokens, masked so that each attends only within its window."""
    tokens = query.shape[2]
    allowed = torch.zeros(tokens, tokens, dtype=torch.bool)
    for start, end in zip(window_bounds[:-1].tolist(), window_bounds[1:].tolist()):
        allowed[start:end, start:end] = True
    output = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
    return output.transpose(1, 2)


@pytest.mark.parametrize("window_lengths", [[13, 13, 13], [13, 13, 4, 13, 7], [5]])
def test_windowed_attention_equals_a_block_diagonal_mask(window_lengths: list[int]) -> None:
    generator = torch.Generator().manual_seed(len(window_lengths))
    tokens = sum(window_lengths)
    query, key, value = (torch.randn(1, 4, tokens, 8, generator=generator) for _ in range(3))
    window_bounds = torch.tensor([0, *window_lengths]).cumsum(0, dtype=torch.int32)

    ours = _attention_within_windows(query, key, value, window_bounds, scaling=0.35)

    expected = block_diagonal_attention(query, key, value, window_bounds, scaling=0.35)
    assert ours.shape == (1, tokens, 4, 8)
    torch.testing.assert_close(ours, expected)
    if len(window_lengths) > 1:  # windows do change the answer, so the comparison has teeth
        unwindowed = block_diagonal_attention(query, key, value, torch.tensor([0, tokens]), scaling=0.35)
        assert not torch.allclose(ours, unwindowed)


@pytest.mark.parametrize(
    "padding",
    [
        [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]],  # left padding, as qwen_asr pads
        [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]],  # right padding
    ],
)
def test_the_causal_padding_mask_equals_transformers_own(padding: list[list[int]]) -> None:
    attention_mask = torch.tensor(padding, dtype=torch.bool)
    arguments = dict(batch_size=len(padding), cache_position=torch.arange(6), kv_length=6, attention_mask=attention_mask)

    ours = causal_padding_mask(**arguments)

    assert ours is not None
    assert torch.equal(ours, sdpa_mask(**arguments))


def test_without_padding_no_mask_is_built() -> None:
    # As transformers does: SDPA's is_causal then does the masking.
    unpadded = torch.ones(2, 5, dtype=torch.bool)
    assert causal_padding_mask(batch_size=2, cache_position=torch.arange(5), kv_length=5, attention_mask=unpadded) is None


@pytest.fixture(scope="module")
def upstream(tiny_checkpoint: Path) -> Qwen3ForcedAligner:
    return Qwen3ForcedAligner.from_pretrained(str(tiny_checkpoint), dtype=torch.float32, device_map="cpu")


@pytest.fixture(scope="module")
def batched(tiny_checkpoint: Path) -> Qwen3ForcedAligner:
    aligner = Qwen3ForcedAligner.from_pretrained(str(tiny_checkpoint), dtype=torch.float32, device_map="cpu")
    enable_batched_inference(aligner.model)
    return aligner


def padded_features(aligner: Qwen3ForcedAligner, frame_counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random mel features for clips of these lengths, right-padded into one batch as the processor does."""
    generator = torch.Generator().manual_seed(sum(frame_counts))
    mel_bins = aligner.model.thinker.audio_tower.num_mel_bins
    features = torch.zeros(len(frame_counts), mel_bins, max(frame_counts))
    mask = torch.zeros(len(frame_counts), max(frame_counts), dtype=torch.long)
    for row, frames in enumerate(frame_counts):
        features[row, :, :frames] = torch.randn(mel_bins, frames, generator=generator)
        mask[row, :frames] = 1
    return features, mask


def encode(aligner: Qwen3ForcedAligner, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return aligner.model.thinker.get_audio_features(features, feature_attention_mask=mask)


def test_one_encoder_pass_equals_upstreams_per_clip_loop(
    upstream: Qwen3ForcedAligner, batched: Qwen3ForcedAligner
) -> None:
    # Up to one 8 s window, upstream's SDPA path and the windowed one attend alike, so whole batches
    # must match. 50 frames: shorter than one chunk, encoded alone; 100: exactly one chunk.
    frame_counts = [300, 50, 799, 100, 257, 800]
    features, mask = padded_features(upstream, frame_counts)

    ours = encode(batched, features, mask)

    theirs = encode(upstream, features, mask)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_a_clip_encodes_the_same_whatever_it_is_batched_with(batched: Qwen3ForcedAligner) -> None:
    frame_counts = [1250, 50, 300, 2000]
    features, mask = padded_features(batched, frame_counts)

    together = encode(batched, features, mask)

    alone = [
        encode(batched, features[row : row + 1, :, :frames], mask[row : row + 1, :frames])
        for row, frames in enumerate(frame_counts)
    ]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-5)


def test_frames_attend_only_within_their_8_s_window(
    upstream: Qwen3ForcedAligner, batched: Qwen3ForcedAligner
) -> None:
    # The first window of a 12 s clip encodes as that window alone would: later audio cannot reach it.
    features, mask = padded_features(batched, [12 * FRAMES_PER_SECOND])
    first_window = features[:, :, :WINDOW_FRAMES], mask[:, :WINDOW_FRAMES]

    ours_whole, ours_window = encode(batched, features, mask), encode(batched, *first_window)

    window_tokens = ours_window.shape[0]
    torch.testing.assert_close(ours_whole[:window_tokens], ours_window, rtol=1e-4, atol=1e-5)
    # Upstream's SDPA path lets every frame see the whole clip, so there the prefix does change.
    theirs_whole, theirs_window = encode(upstream, features, mask), encode(upstream, *first_window)
    assert not torch.allclose(theirs_whole[:window_tokens], theirs_window, rtol=1e-4, atol=1e-5)


def test_batched_inference_switches_every_sub_model(batched: Qwen3ForcedAligner) -> None:
    thinker = batched.model.thinker
    implementations = {
        thinker.config._attn_implementation,
        thinker.audio_tower.config._attn_implementation,
        thinker.model.config._attn_implementation,
    }
    assert implementations == {"windowed_sdpa"}
