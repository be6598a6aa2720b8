"""Switches that change how the decoder runs, not what it computes: activation checkpointing,
per-block `torch.compile`, and FSDP2 sharding (one `fully_shard` unit per `DecoderLayer`)."""

from __future__ import annotations

from typing import Any

import torch

from forge.models.decoder import CausalLM


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
    if whole_model:
        # build the RoPE tables now: filling the cache inside the traced forward would cost a recompile
        rope = model.model.rotary_emb
        rope.tables(rope.args.max_position_embeddings, rope.inv_freq.device)
        model.compile(**compile_kwargs)
        return model
    for layer in model.model.layers:
        layer.compile(**compile_kwargs)
    return model


def apply_fsdp(
    model: CausalLM,
    mesh: Any = None,
    mp_policy: Any = None,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
) -> CausalLM:
    """FSDP2: `fully_shard` every DecoderLayer, then the root (embeddings, final norm, lm_head).

    With tied embeddings the shared weight lives in the root unit, so it is gathered once.
    `reshard_after_forward` applies to the layers (False = ZeRO-2 style, more memory, less comms).
    `mp_policy` e.g. `MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)`.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    n = len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        # the last layer's params are needed again right away by backward: keep them gathered
        fully_shard(layer, reshard_after_forward=reshard_after_forward and i < n - 1, **kw)
    # The root (embeddings, final norm, lm_head) stays gathered after forward: the chunked log-prob
    # helper multiplies by `lm_head.weight` *after* `model(..., return_hidden=True)` returns, and
    # its gradient is then reduce-scattered by FSDP's end-of-backward callback like any other.
    fully_shard(model, reshard_after_forward=False, **kw)
    return model


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
