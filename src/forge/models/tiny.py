"""Tiny random-init models of each family, for tests and the embedded CPU default.

Each family keeps what makes it different from the others, so the tiny model exercises the
same code paths as the real one: llama has llama3 RoPE scaling and untied embeddings, qwen2
has q/k/v biases and tied embeddings, qwen3 has q/k norm and a head_dim unrelated to
hidden_size / heads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from forge.models.args import ModelArgs
from forge.models.decoder import CausalLM

TINY_VOCAB = 512  # the shipped tiny tokenizer's size; ids: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2

_FAMILY: dict[str, dict[str, Any]] = {
    "llama": dict(
        tie_word_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 256},
    ),
    "qwen2": dict(tie_word_embeddings=True, attention_bias=True, rope_theta=1000000.0),
    "qwen3": dict(tie_word_embeddings=True, qk_norm=True, head_dim=48, rope_theta=1000000.0),
}


def tiny_args(family: str = "qwen2", vocab_size: int = TINY_VOCAB, **overrides: Any) -> ModelArgs:
    if family not in _FAMILY:
        raise ValueError(f"unknown tiny family '{family}'; choose from {sorted(_FAMILY)}")
    kw: dict[str, Any] = dict(
        family=family, vocab_size=vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        eos_token_id=2, pad_token_id=0,
    )
    kw.update(_FAMILY[family])
    kw.update(overrides)
    return ModelArgs(**kw)


def build_tiny_model(family: str = "qwen2", seed: int = 0, **overrides: Any) -> CausalLM:
    """A random-init tiny `CausalLM` (fp32, CPU). Same seed -> same weights."""
    model = CausalLM(tiny_args(family, **overrides))
    model.init_weights(std=0.02 * 5, seed=seed)  # larger than usual so logits are not all ~uniform
    return model


def write_tiny_checkpoint(path: str | Path, family: str = "qwen2", seed: int = 0, dtype: torch.dtype | None = None,
                          **overrides: Any) -> Path:
    """Write a real HF model directory: config.json, safetensors, generation config, tokenizer files."""
    from forge.models.hf_io import save_model
    from forge.models.tokenizer import load_tokenizer, tiny_tokenizer_path

    model = build_tiny_model(family, seed, **overrides)
    return save_model(model, path, dtype=dtype, tokenizer=load_tokenizer(tiny_tokenizer_path()))
