"""Tensor parallelism of the built-in engine: one replica of `procs: N` shards the decoder N ways.

Sharding is applied from outside the model (`forge.models` stays free of TP code):

- attention: q/k/v column-wise by KV-head group (rank r keeps KV heads r*Hkv/N .. and the q heads
  they serve, HF's GQA order), o_proj row-wise; the KV cache holds this rank's KV heads only;
- MLP: gate/up column-wise, down row-wise;
- o_proj and down_proj become `RowParallelLinear`: the partial product, one all-reduce (sum),
  then the bias. Two all-reduces per layer. Embedding, norms and lm_head stay whole.

Control plane (`TPGroup.send_plan` / `recv_plan`): rank 0 runs the scheduler and the sampler; each
forward it runs is first broadcast as a plan (op + the batch's token ids, positions, slots, block
tables) over a gloo group, and every other rank runs the same forward on its shard
(`LLMEngine.follow`). Only rank 0's logits are sampled, so every rank agrees on every token.
The fused decode (forge.engine.fused_decode) keeps its decode state on the device and moves it on
from the tokens sampled in the CUDA graph: its plan is the state moves (upload / compact / advance /
block-table entries), and rank 0's sampled tokens (and a prefill's first tokens joining a decode)
reach the other ranks by a broadcast on the data-plane group, inside the graph.
On CUDA the data plane is NCCL (all-reduces and token broadcasts captured in the CUDA graphs) and
plans travel over a separate gloo group; the CPU tests run everything over gloo (the fused kernels
through Triton's interpreter), the NCCL capture itself is not exercised by them.

Weight updates (`load_shards`): each rank copies its own slice of each full tensor by name; a
transport that hands out mapped views (shm, cuda_ipc) is read only where the slice lies, so no
rank materialises another rank's part. A checkpoint directory is read the same way
(`load_model_shard`: safetensors slices straight into the shard).

Not with tensor parallelism yet (an error when asked for, off by default): cuBLASLt GEMM tuning
and norm folding of the fused decode.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from forge.distributed import init_distributed

# parameter-name suffix -> the dim its shards split along (others are whole on every rank)
_COLUMN = ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
           "self_attn.v_proj.weight", "self_attn.v_proj.bias", "mlp.gate_proj.weight", "mlp.gate_proj.bias",
           "mlp.up_proj.weight", "mlp.up_proj.bias")
_ROW = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def check_tp_degree(args: Any, size: int) -> None:
    """A degree that does not divide the heads, KV heads or MLP width is an error naming the numbers."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    bad = [(what, n) for what, n in (("num_attention_heads", args.num_attention_heads),
                                     ("num_key_value_heads", args.num_key_value_heads),
                                     ("intermediate_size", args.intermediate_size)) if n % size]
    if bad:
        raise ValueError(f"tensor_parallel_size={size} must divide the model's " +
                         ", ".join(f"{what}={n}" for what, n in bad) +
                         " (attention is sharded by KV-head group, the MLP by its width)")


@dataclass
class TPGroup:
    """This process's place in its replica's tensor-parallel group."""

    rank: int
    size: int
    group: Any  # the data plane: all-reduce of the row-parallel outputs (NCCL on CUDA, gloo on CPU)
    ctrl: Any  # the control plane: rank 0's plans (gloo)

    @classmethod
    def join(cls, size: int, device: torch.device) -> TPGroup:
        """Join the replica's group from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (forge's monarch
        backend sets them per proc); the replica must have exactly `size` procs. One group per process:
        a second call returns the first's."""
        global _JOINED
        if _JOINED is not None and _JOINED.size == size and dist.is_initialized():
            return _JOINED
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if world != size:
            raise ValueError(f"tensor_parallel_size={size} needs a replica of {size} procs (one per rank); this "
                             f"process has WORLD_SIZE={world} (set the generator's procs to {size})")
        init_distributed(device, size, rank)
        group = dist.group.WORLD
        ctrl = dist.new_group(backend="gloo") if dist.get_backend(group) != "gloo" else group
        _JOINED = cls(rank, size, group, ctrl)
        return _JOINED

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def send_plan(self, plan: tuple) -> None:
        """Rank 0: the next forward (or command) every other rank must run."""
        dist.broadcast_object_list([plan], src=0, group=self.ctrl)

    def recv_plan(self) -> tuple:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.ctrl)
        return box[0]

    def min_int(self, x: int) -> int:
        """The smallest of every rank's `x` (KV cache sizes must agree: rank 0 hands out the block ids)."""
        t = torch.tensor([int(x)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.ctrl)
        return int(t.item())


_JOINED: TPGroup | None = None


class RowParallelLinear(nn.Linear):
    """`y = all_reduce(x @ W_shard^T) + b`: the input features are this rank's shard, W's columns
    too; the bias is whole and added once, after the sum. Parameter names are nn.Linear's, so
    weights load by their HF names."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: Any):
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None,
                         device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


def shard_of(name: str, t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s part of the full tensor `name` (a view; whole tensors come back as they are)."""
    if size == 1:
        return t
    if name.endswith(_COLUMN):
        return t.chunk(size, 0)[rank]
    if name.endswith(_ROW):
        return t.chunk(size, 1)[rank]
    return t


def sharded_for(model: nn.Module) -> tuple[int, int] | None:
    """(rank, size) when `model` is already a tensor-parallel shard (`shard_model`), else None."""
    return getattr(model, "_forge_tp_shard", None)


@torch.no_grad()
def shard_model(model: nn.Module, tp: TPGroup) -> nn.Module:
    """Shard `model` (a `forge.models.decoder.CausalLM`) in place for rank `tp.rank` of `tp.size`
    (works on the meta device too). A model already sharded for this rank is returned as it is."""
    check_tp_degree(model.args, tp.size)
    r, n = tp.rank, tp.size
    done = sharded_for(model)
    if done is not None:
        if done != (r, n):
            raise ValueError(f"the model is rank {done[0]} of {done[1]}'s shard; this process is rank {r} of {n}")
        return model
    for layer in model.model.layers:
        at, mlp = layer.self_attn, layer.mlp
        for lin in (at.q_proj, at.k_proj, at.v_proj, mlp.gate_proj, mlp.up_proj):
            lin.weight = nn.Parameter(lin.weight.chunk(n, 0)[r].clone(), requires_grad=False)
            if lin.bias is not None:
                lin.bias = nn.Parameter(lin.bias.chunk(n, 0)[r].clone(), requires_grad=False)
            lin.out_features = lin.weight.shape[0]
        at.o_proj = RowParallelLinear(at.o_proj.weight.chunk(n, 1)[r], at.o_proj.bias, tp.group)
        mlp.down_proj = RowParallelLinear(mlp.down_proj.weight.chunk(n, 1)[r], mlp.down_proj.bias, tp.group)
        at.n_heads //= n
        at.n_kv //= n
    model.requires_grad_(False)
    model._forge_tp_shard = (r, n)
    return model


@torch.no_grad()
def load_model_shard(path: str | Path, tp: TPGroup, dtype: str | torch.dtype | None = None,
                     device: str | torch.device = "cpu") -> nn.Module:
    """`forge.models.hf_io.load_model` for one rank: the model is built on the meta device, sharded,
    allocated on `device`, and each tensor is read from the safetensors files as this rank's slice
    only (`safe_open(...).get_slice`), so no rank ever holds another rank's part of a layer."""
    from safetensors import safe_open

    from forge.models import hf_io
    from forge.models.decoder import CausalLM

    d = hf_io.resolve_model_path(path)
    args = hf_io.load_args(d)
    files = hf_io._weight_files(d)
    dt = (hf_io.to_dtype(dtype) or hf_io.to_dtype(args.torch_dtype if args.torch_dtype in hf_io._DTYPES else None)
          or torch.float32)
    with torch.device("meta"):
        model = CausalLM(args).to(dt)
    shard_model(model, tp)
    model.to_empty(device=device)
    model.tie_weights()
    hf_io.reset_buffers(model)
    params = dict(model.state_dict(keep_vars=True))
    tied = args.tie_word_embeddings
    seen: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for key in sf.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if hf_io._IGNORED_KEYS.search(key) or (key == "lm_head.weight" and tied):
                    continue
                p = params.get(key)
                if p is None:
                    raise hf_io.CheckpointError(f"checkpoint '{path}': unexpected key {key} (in {f.name})")
                sl = sf.get_slice(key)
                shape = tuple(sl.get_shape())
                if key.endswith(_COLUMN):
                    k = shape[0] // tp.size
                    t = sl[tp.rank * k:(tp.rank + 1) * k]
                elif key.endswith(_ROW):
                    k = shape[1] // tp.size
                    t = sl[:, tp.rank * k:(tp.rank + 1) * k]
                else:
                    t = sl[:]
                if tuple(t.shape) != tuple(p.shape):
                    raise hf_io.CheckpointError(
                        f"shape mismatch for '{key}': checkpoint {f.name} has {shape}, rank {tp.rank} of {tp.size} "
                        f"expects a shard of {tuple(p.shape)} (does config.json match the weights?)")
                hf_io._check_finite(key, t, f)
                p.copy_(t.to(device=p.device, dtype=p.dtype))
                seen.add(key)
    missing = sorted(set(params) - seen - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise hf_io.CheckpointError(f"checkpoint '{path}' misses keys {missing[:8]} ({len(missing)})")
    return model


@torch.no_grad()
def load_shards(model: nn.Module, state_dict: Mapping[str, torch.Tensor] | Iterable, tp: TPGroup | None = None) -> int:
    """`copy_` each given full tensor (or, under tensor parallelism, this rank's shard of it) into the
    parameter/buffer of that name, in place; returns how many were copied. Unknown names and shape
    mismatches are errors (nothing partial is silently accepted)."""
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    items = state_dict.items() if isinstance(state_dict, Mapping) else state_dict
    n = 0
    for name, t in items:
        p = params.get(name)
        if p is None:
            raise KeyError(f"update_weights: unknown parameter '{name}' (see get_model_state_dict_keys)")
        if tp is None:
            if p.shape != t.shape:
                raise ValueError(f"update_weights: '{name}' has shape {tuple(t.shape)}, model has {tuple(p.shape)}")
            p.copy_(t, non_blocking=True)
            n += 1
            continue
        part = shard_of(name, t, tp.rank, tp.size)
        if p.shape != part.shape:
            raise ValueError(f"update_weights: '{name}' has shape {tuple(t.shape)}; its shard for rank {tp.rank} of "
                             f"{tp.size} is {tuple(part.shape)}, the model's is {tuple(p.shape)}")
        p.copy_(part, non_blocking=True)
        n += 1
    first = next(model.parameters())
    if n and first.is_cuda:
        torch.cuda.current_stream(first.device).synchronize()
    return n
