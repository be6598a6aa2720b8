"""Tensor parallelism of the trainer's decoder, applied from outside it (torchtitan's plan).

Per `DecoderLayer`: q/k/v and gate/up are column-parallel (each TP rank holds a slice of the
heads / of the MLP's inner width), o and down are row-parallel (their partial outputs are summed
with one all-reduce each), so a layer costs two all-reduces forward and two backward. The
embedding is row-parallel over the vocabulary; `lm_head` is column-parallel over the vocabulary,
and the logprob helper (`forge.models.logprobs.logprobs_from_hidden`) computes a vocab-parallel
log-softmax from the local slice (loss parallel: no full-vocab gather). Norms keep replicated
weights (DTensor `Replicate`); Qwen3's q/k norms run on each rank's own heads, so their weight
gradients are summed over the TP ranks (DTensor `Partial`).

Sequence parallelism (`parallelism.enable_sequence_parallel`, on by default as in torchtitan):
the residual stream between the blocks is split over the sequence (`Shard(1)`: each TP rank holds
T/tp tokens of the packed row), so the norms run on a rank's own tokens (`SequenceParallel`) and
the activations outside attention/MLP take 1/tp of the memory. Each block's attention and MLP
all-gather their input to the whole sequence (`PrepareModuleInput`), and o / down reduce-scatter
their partial outputs back to `Shard(1)` instead of all-reducing them; the embedding
reduce-scatters too. The final norm's output is all-gathered (the logprob helper picks scored
positions from the whole row). Attention, RoPE and the document masks see the whole sequence, so
positions / document ids need no change; the packed row's length must be a multiple of the TP
degree (the trainer pads it with a masked, never-scored document). Off: the residual stream is
replicated on the TP ranks and o / down all-reduce.

Every parameter becomes a DTensor on the TP mesh; `compile` then compiles each block (with sequence
parallelism only: the replicated-stream blocks fail to trace in torch 2.13) and FSDP2 over `dp_shard`
makes the parameters 2-D.
The decoder itself has no parallelism code: it reads local head counts from the projections'
output widths (`view(b, t, -1, head_dim)`).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from forge.models.args import ModelArgs
from forge.models.decoder import CausalLM


def check_tp_degree(args: ModelArgs, tp: int) -> None:
    """A degree that does not split the heads / KV heads / MLP evenly is an error naming the numbers."""
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        n = getattr(args, name)
        if n % tp:
            raise ValueError(f"parallelism.tensor_parallel_degree={tp} does not divide the model's {name}={n}: "
                             f"each TP rank must hold the same number of them")


class ReplicatedParallel(ParallelStyle):
    """A module whose input is the same on every TP rank (the replicated residual stream): its
    parameters become `Replicate` DTensors, it takes and returns plain tensors."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(name, nn.Parameter(distribute_tensor(p.data, device_mesh, [Replicate()]),
                                                         requires_grad=p.requires_grad))

        def to_dtensor(mod: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
            return tuple(DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
                         if not isinstance(x, DTensor) and hasattr(x, "dim") else x for x in inputs)

        def to_local(mod: nn.Module, inputs: tuple[Any, ...], out: Any) -> Any:
            return out.to_local() if isinstance(out, DTensor) else out

        module.register_forward_pre_hook(to_dtensor)
        module.register_forward_hook(to_local)
        return module


class SequenceParallelGathered(SequenceParallel):
    """`SequenceParallel` (input: this rank's tokens, `Shard(1)`) whose output is all-gathered to the
    whole sequence and returned as a plain tensor: the final norm under sequence parallelism."""

    @staticmethod
    def _prepare_output_fn(use_local_output: bool, mod: nn.Module, outputs: Any, device_mesh: DeviceMesh) -> Any:
        return outputs.redistribute(device_mesh, [Replicate()]).to_local()


def _check_sequence_length(tp: int):
    def hook(mod: nn.Module, inputs: tuple[Any, ...]) -> None:
        t = inputs[0].shape[1]
        if t % tp:
            raise ValueError(f"sequence parallelism over {tp} TP ranks needs a sequence length that is a multiple of "
                             f"{tp}, got {t} (the trainer pads its packed rows; set "
                             "parallelism.enable_sequence_parallel: false to run other lengths)")
    return hook


def apply_tp(model: CausalLM, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> CausalLM:
    """Shard `model` in place over `tp_mesh` (1-D). Call before FSDP, compile and the optimizer.

    `sequence_parallel`: the residual stream and the norms split over the sequence (see the module
    docstring); the model then takes only sequence lengths that are a multiple of the TP degree."""
    tp = tp_mesh.size()
    check_tp_degree(model.args, tp)
    tied = model.args.tie_word_embeddings
    sp = sequence_parallel
    stream = Shard(1) if sp else Replicate()  # the residual stream's layout between the blocks
    if sp:
        model.model.embed_tokens.register_forward_pre_hook(_check_sequence_length(tp))
    parallelize_module(model, tp_mesh, {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=stream),
        "model.norm": SequenceParallelGathered() if sp else ReplicatedParallel(),
        # never called as a module by the trainer (the logprob helper reads its weight, vocab-parallel);
        # a plain `model(tokens)` still returns whole logits (gathered)
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    })
    # the embedding's output is a view of a DTensor's local tensor (`to_local`); as the input of a compiled
    # block, AOTAutograd sends its gradient past `to_local`'s backward as a plain tensor of the global shape
    # and DTensor's redistribute backward fails on it (torch 2.13). A copy (T/tp x hidden) cuts the view.
    model.model.embed_tokens.register_forward_hook(lambda mod, inputs, out: out.clone())
    if tied:  # both halves were distributed as Shard(0) over the vocabulary: one parameter again
        model.model.embed_tokens.weight = model.lm_head.weight
        model.tie_weights()
    for layer in model.model.layers:
        plan: dict[str, ParallelStyle] = {
            "input_layernorm": SequenceParallel() if sp else ReplicatedParallel(),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=stream),
            "post_attention_layernorm": SequenceParallel() if sp else ReplicatedParallel(),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=stream),
        }
        if sp:  # attention / MLP all-gather the normed tokens (Shard(1)) into the whole sequence
            # Attention.forward(x, cos, sin, attention): cos/sin cover the whole sequence already
            plan["self_attn"] = PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                                   desired_input_layouts=(Replicate(), None, None, None),
                                                   use_local_output=True)
            plan["mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                             use_local_output=True)
        if layer.self_attn.q_norm is not None:  # on [B, T, heads, D]: each rank normalises its own heads
            plan["self_attn.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["self_attn.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        parallelize_module(layer, tp_mesh, plan)
    return model
