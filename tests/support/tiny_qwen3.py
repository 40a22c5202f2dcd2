"""Write a tiny, randomly initialised Qwen3-ForcedAligner checkpoint, fully offline.

The real weights cannot be downloaded here or in CI, so tests and benchmarks load this instead. It
is the real architecture (qwen_asr's config and model classes, a Qwen2 byte-level BPE tokenizer, a
Whisper-style 128-mel feature extractor) at toy width, and it loads through the same
`Qwen3ForcedAligner.from_pretrained(path)` call as the production checkpoint. Its timings are
meaningless; its shapes, token ids, batching and failure paths are the real ones.

Deterministic: the same seed and dimensions give byte-identical weights. Run as a script:

    python -m tests.support.tiny_qwen3 DIR [--hidden-size N] [--layers N] [--seed N]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

# The forced-aligner head: one class per 80 ms step, as in the released model (400 s addressable).
TIMESTAMP_CLASSES = 5000
TIMESTAMP_SEGMENT_MS = 80
MEL_BINS = 128  # the feature extractor and the audio encoder must agree

# The Qwen2 pre-tokenisation regex, so the tiny tokenizer splits text the way the real one does.
_QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PAD_TOKEN = "<|endoftext|>"
_AUDIO_BOS, _AUDIO_TOKEN, _AUDIO_EOS = "<|audio_start|>", "<|audio_pad|>", "<|audio_end|>"
_TIMESTAMP_TOKEN = "<timestamp>"
_SPECIAL_TOKENS = (
    _PAD_TOKEN, "<|im_start|>", "<|im_end|>", _AUDIO_BOS, _AUDIO_EOS, _AUDIO_TOKEN, _TIMESTAMP_TOKEN
)


@dataclass(frozen=True)
class TinyDimensions:
    """The knobs that set the checkpoint's size; everything else follows the released model.

    The defaults are the test checkpoint; the fields after `initializer_range` are derived from
    `hidden_size` and `layers` unless set (FULL_SIZE sets them all)."""

    hidden_size: int = 32  # text decoder width; the audio encoder's output must equal it
    layers: int = 2  # decoder layers and audio encoder layers alike
    seed: int = 0
    # Random weights at the usual 0.02 scale give near-uniform logits and the same timestamp for
    # every slot; a wider spread makes outputs depend on the input, so tests can tell them apart.
    initializer_range: float = 0.5
    head_dim: int = 8
    intermediate_size: int | None = None  # 2 x hidden_size
    key_value_heads: int | None = None  # half the attention heads
    audio_layers: int | None = None  # `layers`
    audio_width: int | None = None  # the encoder's d_model: hidden_size / 2
    audio_heads: int = 2
    audio_ffn: int | None = None  # hidden_size
    downsample_hidden_size: int = 8
    vocab_size: int | None = None  # the tiny tokenizer's (an embedding table may be larger than its tokenizer)


# The released model's shapes at full size: a Qwen3-0.6B decoder (28 layers of 1024, 16 heads of
# 128, 8 KV heads) behind the Qwen3-ASR-0.6B audio encoder (18 layers of 896, 14 heads), about
# 0.73 B parameters with the embedding table: what a GPU replica holds, with random weights
# (bench/gpu_graph.py). The real weights cannot be downloaded here or on the GPU machines.
FULL_SIZE = TinyDimensions(
    hidden_size=1024, layers=28, initializer_range=0.02, head_dim=128, intermediate_size=3072, key_value_heads=8,
    audio_layers=18, audio_width=896, audio_heads=14, audio_ffn=3584, downsample_hidden_size=480, vocab_size=151_936,
)  # fmt: skip


def _build_tokenizer():
    """A Qwen2 fast tokenizer over the 256 byte symbols plus the aligner's special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    byte_symbols = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(byte_symbols))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=False))
    # The same layout as the real Qwen2 tokenizer.json: regex split, then byte-level mapping.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return Qwen2TokenizerFast(
        tokenizer_object=backend,
        additional_special_tokens=list(_SPECIAL_TOKENS[1:]),
        extra_special_tokens={
            "audio_token": _AUDIO_TOKEN,
            "audio_bos_token": _AUDIO_BOS,
            "audio_eos_token": _AUDIO_EOS,
        },
        unk_token=_PAD_TOKEN,
        eos_token=_PAD_TOKEN,
        pad_token=_PAD_TOKEN,
    )


def _build_config(tokenizer, dims: TinyDimensions):
    from qwen_asr.core.transformers_backend import Qwen3ASRConfig

    head_dim = dims.head_dim
    attention_heads = dims.hidden_size // head_dim
    text_config = {
        "vocab_size": max(len(tokenizer), dims.vocab_size or 0),
        "hidden_size": dims.hidden_size,
        "intermediate_size": dims.intermediate_size or dims.hidden_size * 2,
        "num_hidden_layers": dims.layers,
        "num_attention_heads": attention_heads,
        "num_key_value_heads": dims.key_value_heads or max(1, attention_heads // 2),
        "head_dim": head_dim,
        "max_position_embeddings": 65536,
        "tie_word_embeddings": False,
        "initializer_range": dims.initializer_range,
        # Must be a dict (the rotary embedding reads mrope_section from it); the three sections
        # cover head_dim / 2 rotary frequencies.
        "rope_scaling": {"rope_type": "default", "mrope_section": _mrope_sections(head_dim), "interleaved": True},
    }
    audio_config = {
        "num_mel_bins": MEL_BINS,
        "encoder_layers": dims.audio_layers or dims.layers,
        "encoder_attention_heads": dims.audio_heads,
        "encoder_ffn_dim": dims.audio_ffn or dims.hidden_size,
        "d_model": dims.audio_width or dims.hidden_size // 2,
        "output_dim": dims.hidden_size,  # feeds the decoder's embedding space directly
        "downsample_hidden_size": dims.downsample_hidden_size,
        # The processor counts audio tokens assuming 100-frame chunks (13 tokens each), so the
        # encoder's chunk (2 * n_window) must be 100 frames whatever the width.
        "n_window": 50,
        "n_window_infer": 800,
        "initializer_range": dims.initializer_range,
    }
    thinker_config = {
        "model_type": "qwen3_forced_aligner",  # selects the timestamp head in the thinker
        "classify_num": TIMESTAMP_CLASSES,
        "audio_config": audio_config,
        "text_config": text_config,
        "audio_token_id": tokenizer.convert_tokens_to_ids(_AUDIO_TOKEN),
        "audio_start_token_id": tokenizer.convert_tokens_to_ids(_AUDIO_BOS),
        "initializer_range": dims.initializer_range,
        "tie_word_embeddings": False,
    }
    return Qwen3ASRConfig(
        thinker_config=thinker_config,
        support_languages=None,
        timestamp_token_id=tokenizer.convert_tokens_to_ids(_TIMESTAMP_TOKEN),
        timestamp_segment_time=TIMESTAMP_SEGMENT_MS,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )


def _mrope_sections(head_dim: int) -> list[int]:
    """Temporal, height and width rotary sections over head_dim / 2 frequencies ([2, 1, 1] at 8, [24, 20, 20] at 128)."""
    if head_dim == 8:
        return [2, 1, 1]
    spatial = head_dim * 5 // 32
    return [head_dim // 2 - 2 * spatial, spatial, spatial]


def _restore_thinker_model_type(directory: Path) -> None:
    """`save_pretrained` writes the thinker's class-level model_type; put the aligner's back.

    Without this, reloading builds a vocabulary-sized LM head instead of the timestamp head.
    """
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["thinker_config"]["model_type"] = "qwen3_forced_aligner"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tiny_checkpoint(directory: Path, dims: TinyDimensions = TinyDimensions(), dtype: str = "float32") -> Path:
    """Write the checkpoint into `directory` (created if missing) and return it; `dtype` of the saved weights."""
    import torch
    from qwen_asr.core.transformers_backend import Qwen3ASRForConditionalGeneration, Qwen3ASRProcessor
    from transformers import WhisperFeatureExtractor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer()
    config = _build_config(tokenizer, dims)
    torch.manual_seed(dims.seed)
    model = Qwen3ASRForConditionalGeneration(config).eval().to(getattr(torch, dtype))
    model.save_pretrained(directory)
    _restore_thinker_model_type(directory)

    feature_extractor = WhisperFeatureExtractor(
        feature_size=MEL_BINS, sampling_rate=16_000, return_attention_mask=True
    )
    Qwen3ASRProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--hidden-size", type=int, default=TinyDimensions.hidden_size)
    parser.add_argument("--layers", type=int, default=TinyDimensions.layers)
    parser.add_argument("--seed", type=int, default=TinyDimensions.seed)
    args = parser.parse_args()
    dims = TinyDimensions(hidden_size=args.hidden_size, layers=args.layers, seed=args.seed)
    print(write_tiny_checkpoint(args.directory, dims))


if __name__ == "__main__":
    main()
