"""Switches that change how the decoder runs, not what it computes: activation checkpointing and
per-block `torch.compile`. (FSDP2 sharding is the trainer's: `forge.trainer.parallel.apply_fsdp`.)"""

from __future__ import annotations

from typing import Any

from forge.models.decoder import CausalLM

COMPILE_BACKEND = "inductor"  # tests swap in "aot_eager" to trace the same graphs without a C++ build


def enable_activation_checkpointing(model: CausalLM, enabled: bool = True) -> CausalLM:
    """Recompute each DecoderLayer's activations in backward (trades ~1/3 more compute for memory)."""
    model.activation_checkpointing = enabled
    return model


def maybe_compile(model: CausalLM, enabled: bool = True, whole_model: bool = False, **compile_kwargs: Any) -> CausalLM:
    """`torch.compile` each DecoderLayer in place (`Module.compile`), as torchtitan does.

    Per-block compilation keeps compile time ~one layer's (all layers share one graph: training
    attention is layer-agnostic, see `LayerAgnosticAttention`), composes with FSDP2 and activation
    checkpointing, and leaves parameter names (state_dict keys) unchanged.
    `whole_model=True` compiles the whole `CausalLM.forward` as one graph instead: one guard
    check and one launch wrapper per step instead of per layer (less host overhead; longer compile).
    """
    if not enabled:
        return model
    compile_kwargs.setdefault("fullgraph", False)
    compile_kwargs.setdefault("backend", COMPILE_BACKEND)
    if whole_model:
        # build the RoPE tables now: filling the cache inside the traced forward would cost a recompile
        rope = model.model.rotary_emb
        rope.tables(rope.args.max_position_embeddings, rope.inv_freq.device)
        model.compile(**compile_kwargs)
        return model
    for layer in model.model.layers:
        layer.compile(**compile_kwargs)
    return model
