"""`TrainEngine`: model + optimizer + schedule + checkpoints, no actor runtime in it.

The RL `Trainer` actor and the SFT app both drive one of these. A step:

1. take this rank's rows of the batch (every rank gets the whole batch and slices it);
2. strip padding and pack the real tokens into micro-batches (`forge.trainer.packing`);
3. forward + backward each micro-batch with its loss weighted so that the accumulated gradient
   is the full batch's (see `forge.trainer.step`);
4. clip the gradient norm (reported before clipping), AdamW step, LR schedule step.

Parallelism (`trainer.parallelism`): the replica's procs form a `("dp_shard", "tp")` mesh. The
ranks of one TP group (`forge.trainer.tensor_parallel`) train on the same rows; batch rows, the
loss normalisers and FSDP2's gradient averaging go over `dp_shard` only.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from forge.models import lora
from forge.models.decoder import CausalLM
from forge.models.parallel import enable_activation_checkpointing, maybe_compile
from forge.observability import Reduce, record_metric
from forge.trainer import checkpoint as ckpt
from forge.trainer.config import TrainerConfig
from forge.trainer.optim import build_lr_scheduler, build_optimizer
from forge.trainer.packing import (
    MicroBatch,
    PackedSeq,
    dummy_microbatch,
    pack,
    sequences_from_rl_batch,
    sequences_from_sft_batch,
)
from forge.trainer.parallel import (
    all_reduce_max,
    all_reduce_sum,
    apply_fsdp,
    build_mesh,
    init_distributed,
)
from forge.trainer.step import (
    LogprobModel,
    SFTLoss,
    agg_mode,
    microbatch_weight,
    normaliser_counts,
    run_microbatch,
)
from forge.trainer.tensor_parallel import apply_tp

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# dense bf16 peak FLOP/s by GPU name, for MFU
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12, "L40S": 362e12}


def build_model(spec: dict[str, Any], device: torch.device) -> CausalLM:
    """`{"path": dir}` (HF directory) or `{"tiny": family, "seed": s, **overrides}`."""
    if "path" in spec:
        from forge.models.hf_io import load_model

        model = load_model(spec["path"], dtype=torch.float32, device=device)
    else:
        from forge.models.tiny import build_tiny_model

        kw = {k: v for k, v in spec.items() if k not in ("tiny", "seed")}
        model = build_tiny_model(spec["tiny"], int(spec.get("seed", 0)), **kw).to(device)
    return model


def merge_batch(parts: list[dict[str, Any]], rank: int, world: int, who: str) -> dict[str, Any]:
    """torchforge sends one dict per data-parallel rank; forge sends one dict to every rank."""
    if not isinstance(parts, (list, tuple)) or not parts or not all(isinstance(p, dict) for p in parts):
        raise TypeError(f"{who} must be a non-empty list of dicts (see 'Trainer batch' in docs/CONTRACTS.md), got {type(parts).__name__}")
    if len(parts) == 1:
        return parts[0]
    if len(parts) == world:
        return {"__local__": True, **parts[rank]}
    raise ValueError(f"{who} has {len(parts)} parts; expected 1 (whole batch) or {world} (one per rank)")


def rank_rows(n: int, rank: int, world: int) -> Tensor:
    return torch.tensor_split(torch.arange(n), world)[rank]


class TrainEngine:
    def __init__(self, cfg: TrainerConfig | dict[str, Any], device: torch.device | str = "cpu", rank: int = 0,
                 world_size: int = 1, loss: nn.Module | None = None, model: CausalLM | None = None):
        if isinstance(cfg, TrainerConfig):
            cfg.validate()  # a typed config built by hand; from_dict validates what it builds
        self.cfg = cfg if isinstance(cfg, TrainerConfig) else TrainerConfig.from_dict(cfg)
        if self.cfg.unused:
            log.warning("trainer config keys not used by forge: %s", ", ".join(self.cfg.unused))
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        # the procs form a ("dp_shard", "tp") mesh: a TP group computes on the same rows, FSDP2 shards over dp
        self.dp, self.tp = self.cfg.parallelism.resolve(world_size)
        self.dp_rank = rank // self.tp
        if self.tp > 1:
            self._check_tp_combinations()
        self.distributed = init_distributed(self.device, world_size, rank)
        self.mesh = build_mesh(self.device, self.dp, self.tp) if self.tp > 1 else None
        self.dp_group = self.mesh["dp_shard"].get_group() if self.mesh is not None else None
        self.fsdp = self.dp > 1
        tc = self.cfg.training
        torch.manual_seed(tc.seed)
        self.model = model.to(self.device) if model is not None else build_model(self.cfg.model, self.device)
        self.model.float()  # fp32 master weights; bf16 only inside autocast / FSDP mixed precision
        self.lora = self.cfg.lora
        if self.lora is not None:
            self._apply_lora(self.lora)
        self.model.train()
        if self.mesh is not None:
            apply_tp(self.model, self.mesh["tp"], sequence_parallel=self.cfg.parallelism.enable_sequence_parallel)
        enable_activation_checkpointing(self.model, tc.activation_checkpoint)
        maybe_compile(self.model, tc.compile)
        self.module = LogprobModel(self.model, tc.temperature, tc.logprob_chunk_size,
                                   loss_parallel=not self.cfg.parallelism.disable_loss_parallel)
        on_gpu = self.device.type == "cuda"
        self.compute_dtype = _DTYPES[tc.dtype] if on_gpu else torch.float32
        if self.fsdp:
            apply_fsdp(self.module, self.model.model.layers,
                       param_dtype=self.compute_dtype if self.compute_dtype != torch.float32 else None,
                       mesh=self.mesh["dp_shard"] if self.mesh is not None else None)
        self.autocast = (torch.autocast("cuda", dtype=self.compute_dtype)
                         if on_gpu and self.compute_dtype != torch.float32 and not self.fsdp else nullcontext())
        self.pad_to_multiple = 128 if on_gpu else 1  # FlexAttention block size; CPU: no padding at all
        if self.tp > 1 and self.cfg.parallelism.enable_sequence_parallel:  # rows split evenly over the TP ranks
            self.pad_to_multiple = math.lcm(self.pad_to_multiple, self.tp)
        if loss is None:
            from forge.losses import build_loss

            loss = build_loss(self.cfg.loss)
        self.loss_fn = loss
        self.optimizer = build_optimizer(self.module.parameters(), self.cfg.optimizer, self.device)
        self.scheduler = build_lr_scheduler(self.optimizer, self.cfg.lr_scheduler)
        self.step = 0
        self.extra: dict[str, Any] = {}

    def _check_tp_combinations(self) -> None:
        """What does not compose with tensor parallelism yet: refused, naming the keys."""
        if self.cfg.lora is not None:
            raise ValueError(f"trainer.model.lora with parallelism.tensor_parallel_degree={self.tp}: LoRA adapters "
                             "are not tensor-parallel yet; use tensor_parallel_degree: 1 (FSDP over the procs)")
        if self.cfg.training.compile and not self.cfg.parallelism.enable_sequence_parallel:
            # the replicated-stream blocks: AOTAutograd's trace recurses past Python's limit (torch 2.13, CPU)
            raise ValueError(f"compile: true with parallelism.tensor_parallel_degree={self.tp} and "
                             "enable_sequence_parallel: false: torch.compile of the blocks without sequence "
                             "parallelism fails (AOTAutograd's trace exceeds the recursion limit); keep "
                             "enable_sequence_parallel: true (the default) or turn compile off")

    # ------------------------------------------------------------------ LoRA
    def _apply_lora(self, cfg: lora.LoraConfig) -> None:
        """Adapters on the frozen model, before compile/FSDP wrap it; the optimizer then sees only
        them (it takes parameters that require grad). `init_from`: a peft adapter to continue."""
        if cfg.base_dtype is not None and self.world_size > 1:
            raise ValueError(f"trainer.model.lora.base_dtype={cfg.base_dtype!r} with {self.world_size} procs: FSDP2 "
                             "shards a block's parameters as one dtype; leave base_dtype unset (FSDP keeps the "
                             "frozen base in training.dtype for compute) or train on one proc")
        if cfg.init_from:
            lora.load_peft_adapter(self.model, cfg.init_from, cfg)
        else:
            lora.apply_lora(self.model, cfg)
        n = sum(p.numel() for p in lora.adapter_parameters(self.model))
        log.info("LoRA r=%d alpha=%s on %d modules: %d trainable parameters (%.2f%% of %d)", cfg.r, cfg.alpha,
                 len(lora.lora_modules(self.model)), n, 100 * n / max(1, sum(p.numel() for p in self.model.parameters())),
                 sum(p.numel() for p in self.model.parameters()))

    def publish_source(self) -> nn.Module:
        """What weight sync publishes: the whole model, or with LoRA only the adapters (`lora.AdapterView`)."""
        return lora.AdapterView(self.model) if self.lora is not None else self.module

    def base_model(self):
        """Context: the base model (adapters off) — the reference policy under LoRA, no second copy."""
        if self.lora is None:
            raise ValueError("base_model(): the trainer has no LoRA adapters; its weights are the trained ones")
        return lora.adapters_disabled(self.model)

    def save_adapter(self, path: str | Path) -> Path:
        """The adapters in HF peft format (adapter_model.safetensors + adapter_config.json); collective."""
        if self.lora is None:
            raise ValueError("save_adapter: trainer.model.lora is not set (nothing but full weights to save)")
        return lora.save_peft_adapter(self.model, path, self.lora, base_model_name_or_path=self.cfg.model.get("path"))

    # ------------------------------------------------------------------ batch preparation
    def _rl_sequences(self, inputs: list[dict], targets: list[dict], score_key: str = "padding_mask"
                      ) -> tuple[list[PackedSeq], dict[str, Any], int, Tensor]:
        inp = merge_batch(inputs, self.dp_rank, self.dp, "inputs")
        tgt = merge_batch(targets, self.dp_rank, self.dp, "targets")
        for k in ("tokens",):
            if k not in inp:
                raise KeyError(f"inputs lack '{k}' (have {sorted(inp)})")
        for k in ("response", "padding_mask"):
            if k not in tgt:
                raise KeyError(f"targets lack '{k}' (have {sorted(tgt)})")
        tokens, response = inp["tokens"], tgt["response"]
        b, r = response.shape
        if tokens.shape[0] != b:
            raise ValueError(f"inputs tokens have {tokens.shape[0]} rows but targets response {b}")
        rows = torch.arange(b) if (inp.get("__local__") or self.dp == 1) else rank_rows(b, self.dp_rank, self.dp)
        score = tgt.get(score_key, tgt["padding_mask"])
        pm = inp.get("prompt_mask")
        seqs = sequences_from_rl_batch(tokens[rows], r, score[rows], None if pm is None else pm[rows],
                                       self.cfg.training.pad_id)
        local = {k: (v[rows] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == b else v)
                 for k, v in tgt.items()}
        return seqs, local, r, rows

    def _microbatches(self, seqs: list[PackedSeq]) -> list[MicroBatch | None]:
        mbs: list[MicroBatch | None] = list(pack(seqs, self.cfg.training.max_tokens_per_microbatch, self.pad_to_multiple))
        if self.distributed:  # every rank must run the same number of FSDP forwards/backwards
            n = all_reduce_max(len(mbs), self.device)
            mbs += [None] * (n - len(mbs))
        return mbs

    # ------------------------------------------------------------------ training
    def train_step(self, inputs: list[dict], targets: list[dict]) -> float:
        """One optimizer step on an RL batch. Returns the batch loss (global, not summed over ranks)."""
        seqs, tgt, width, _ = self._rl_sequences(inputs, targets)
        return self._step(seqs, tgt, width, self.loss_fn, prefix="rl_trainer")

    def sft_step(self, batch: dict[str, Tensor]) -> float:
        """One optimizer step of SFT: `batch = {"tokens": [B,T], "loss_mask": [B,T]}` (right-padded;
        loss_mask 1 on tokens to learn), cross-entropy on those tokens only."""
        tokens, mask = batch["tokens"], batch["loss_mask"]
        b = tokens.shape[0]
        rows = rank_rows(b, self.dp_rank, self.dp) if self.dp > 1 else torch.arange(b)
        lengths = batch.get("lengths")
        seqs = sequences_from_sft_batch(tokens[rows], mask[rows], lengths[rows] if lengths is not None else None)
        tgt = {"padding_mask": mask[rows][:, 1:]}
        return self._step(seqs, tgt, tokens.shape[1] - 1, SFTLoss(), prefix="sft_trainer")

    def _step(self, seqs: list[PackedSeq], tgt: dict[str, Any], width: int, loss_fn: nn.Module, prefix: str) -> float:
        t0 = time.perf_counter()
        self.module.train()
        mode = agg_mode(loss_fn)
        pmask = tgt["padding_mask"]
        local_counts = normaliser_counts(pmask)
        n_real = sum(s.tokens.numel() for s in seqs)
        total = all_reduce_sum([*local_counts, float(n_real)], self.device, self.dp_group)
        mbs = self._microbatches(seqs)
        scale = float(self.dp) if self.fsdp else 1.0  # undo FSDP's gradient averaging
        loss_acc = torch.zeros((), dtype=torch.float64)
        for mb in mbs:
            if mb is None:
                with self.autocast:
                    lp, _ = self.module(*_args(dummy_microbatch(self.pad_to_multiple).to(self.device)))
                (lp.sum() * 0.0).backward()
                continue
            mb = mb.to(self.device)
            with self.autocast:
                lp, ent = run_microbatch(self.module, mb, width)
            sub = {k: (v[mb.rows.cpu()].to(self.device) if isinstance(v, Tensor) and v.dim() > 0 else v)
                   for k, v in tgt.items()}
            loss = _call_loss(loss_fn, lp, ent, sub)
            w = microbatch_weight(mode, normaliser_counts(sub["padding_mask"]), (total[0], total[1]))
            (loss * (w * scale)).backward()
            loss_acc += loss.detach().double().cpu() * w
        loss_value = all_reduce_sum([float(loss_acc)], self.device, self.dp_group)[0]
        grad_norm = self._clip_and_step()
        dt = time.perf_counter() - t0
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        if self.rank == 0:
            record_metric(f"{prefix}/avg_loss", loss_value, Reduce.MEAN)
            record_metric(f"{prefix}/grad_norm", grad_norm, Reduce.MEAN)
            record_metric(f"{prefix}/lr", lr, Reduce.MEAN)
            record_metric(f"{prefix}/tokens_per_s", total[2] / dt, Reduce.MEAN)
            record_metric(f"{prefix}/num_microbatches", len(mbs), Reduce.MEAN)
            record_metric(f"{prefix}/step_time_s", dt, Reduce.MEAN)
            mfu = self._mfu(total[2], dt, seqs)
            if mfu is not None:
                record_metric(f"{prefix}/mfu", mfu, Reduce.MEAN)
            self._record_memory(prefix)
        self.last_grad_norm = grad_norm
        return loss_value

    def _clip_and_step(self) -> float:
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.cfg.training.max_norm
        clip = max_norm if max_norm and max_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        norm_f = float(norm)
        if math.isfinite(norm_f):
            self.optimizer.step()
        else:  # a non-finite gradient would poison the weights: drop this update
            log.warning("step %d: non-finite grad norm %s, optimizer step skipped", self.step, norm_f)
            record_metric("rl_trainer/skipped_steps", 1, Reduce.SUM)
        self.optimizer.zero_grad(set_to_none=True)
        return norm_f

    def _record_memory(self, prefix: str) -> None:
        """Weights + gradients + optimizer states this rank holds (what LoRA shrinks), and the device's peak."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.module.parameters()]
        state = sum(p.numel() * p.element_size() for p in local)
        state += sum(p.numel() * 4 * 3 for p in local if p.requires_grad)  # fp32 grad + AdamW's two moments
        record_metric(f"{prefix}/train_state_gb", state / 2**30, Reduce.MAX)
        if self.device.type == "cuda":
            record_metric(f"{prefix}/peak_memory_gb", torch.cuda.max_memory_allocated(self.device) / 2**30, Reduce.MAX)

    def _mfu(self, tokens: float, dt: float, seqs: list[PackedSeq]) -> float | None:
        if self.device.type != "cuda" or not seqs:
            return None
        name = torch.cuda.get_device_name(self.device)
        peak = next((v for k, v in _PEAK_FLOPS.items() if k in name), None)
        if peak is None:
            return None
        mean_len = sum(s.tokens.numel() for s in seqs) / len(seqs)
        flops = self.model.args.flops_per_token(int(mean_len)) * tokens
        return flops / (dt * peak * self.world_size)

    # ------------------------------------------------------------------ inference-only
    @torch.no_grad()
    def forward_logprobs(self, inputs: list[dict], targets: list[dict], score_key: str = "padding_mask",
                         base: bool = False) -> Tensor:
        """The trainer's logprobs `[B, R]` of the given response tokens (0 where not scored), at the
        training temperature. Every rank returns the whole batch's. `base=True` (LoRA): the base
        model's, adapters off (the reference policy)."""
        if base:
            with self.base_model():
                return self.forward_logprobs(inputs, targets, score_key)
        was_training = self.module.training
        self.module.eval()
        seqs, _, width, rows = self._rl_sequences(inputs, targets, score_key)
        b = targets[0]["response"].shape[0] if len(targets) == 1 else None
        out = torch.zeros(b if b is not None else rows.numel(), width, dtype=torch.float32, device=self.device)
        for mb in self._microbatches(seqs):
            if mb is None:
                with self.autocast:
                    self.module(*_args(dummy_microbatch(self.pad_to_multiple).to(self.device)))
                continue
            mb = mb.to(self.device)
            with self.autocast:
                lp, _ = run_microbatch(self.module, mb, width)
            target_rows = rows.to(self.device)[mb.rows.to(self.device)] if b is not None else mb.rows.to(self.device)
            out[target_rows] = lp.float()
        if self.dp > 1 and b is not None:
            import torch.distributed as dist

            dist.all_reduce(out, group=self.dp_group)  # rows are disjoint across dp ranks: the sum assembles the batch
        if self.fsdp:
            reshard(self.module)
        self.module.train(was_training)
        return out

    # ------------------------------------------------------------------ checkpoints / export
    def save(self, step: int | None = None, extra: dict[str, Any] | None = None) -> Path:
        c = self.cfg.checkpoint
        if not c.dir:
            raise ValueError("checkpoint.dir is not set: nowhere to save")
        if extra is not None:
            self.extra = dict(extra)
        return ckpt.save_checkpoint(c.dir, self.step if step is None else step, self.module, self.optimizer,
                                    self.scheduler, {"extra": self.extra, "trainer_step": self.step}, c.keep_last_n)

    def load(self, path: str | Path | None = None) -> dict[str, Any] | None:
        """Load `path`, or resume from the newest good checkpoint of `checkpoint.dir`."""
        if path is not None:
            out = ckpt.load_checkpoint(path, self.module, self.optimizer, self.scheduler)
            out["path"] = Path(path)
        else:
            if not self.cfg.checkpoint.dir:
                raise ValueError("checkpoint.dir is not set: nowhere to resume from")
            out = ckpt.resume_latest(self.cfg.checkpoint.dir, self.module, self.optimizer, self.scheduler)
            if out is None:
                return None
        saved = out["extra"]
        self.step = int(saved.get("trainer_step", out["step"]))
        self.extra = dict(saved.get("extra", {}))
        return {"step": out["step"], "extra": self.extra, "path": str(out["path"])}

    def maybe_save(self, extra: dict[str, Any] | None = None) -> Path | None:
        c = self.cfg.checkpoint
        if c.dir and c.interval and self.step % c.interval == 0:
            return self.save(extra=extra)
        return None

    def export_hf(self, path: str | Path, dtype: str | torch.dtype | None = None) -> Path | None:
        """HF safetensors directory (collective under FSDP; rank 0 writes)."""
        from forge.models.hf_io import save_model

        if self.lora is not None:  # the adapters merged into the base weights
            return lora.save_merged_hf(self.model, path, dtype)
        if not self.distributed:
            return save_model(self.model, path, dtype=dtype)
        # gather one parameter at a time into a CPU copy on rank 0
        with torch.device("meta"):
            host = CausalLM(self.model.args)
        host.to_empty(device="cpu")
        host.tie_weights()
        host_sd = host.state_dict()
        for name, t in self.model.state_dict().items():
            full = t.full_tensor() if hasattr(t, "full_tensor") else t
            if self.rank == 0:
                host_sd[name].copy_(full.detach().cpu())
            del full
        out = save_model(host, path, dtype=dtype) if self.rank == 0 else None
        import torch.distributed as dist

        dist.barrier()
        return out

    def named_parameters(self):
        """(HF name, parameter) — DTensor shards under FSDP; weight sync gathers them one by one."""
        return self.model.named_parameters()


def reshard(module: nn.Module) -> None:
    """Return FSDP units left gathered by a forward with no backward (the root and the last
    layer keep their parameters after forward) to their sharded state."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _args(mb: MicroBatch) -> tuple:
    return (mb.tokens, mb.positions, mb.document_ids, mb.gather_idx, mb.targets)


def _call_loss(loss_fn: nn.Module, lp: Tensor, ent: Tensor, t: dict[str, Any]) -> Tensor:
    kw = {"entropy": ent}
    for k in ("generator_logprobs", "old_logprobs"):
        if t.get(k) is not None:
            kw[k] = t[k].float()
    ref = t.get("ref_logprobs")
    adv = t.get("advantages")
    if adv is None and not isinstance(loss_fn, SFTLoss):
        raise KeyError("targets lack 'advantages'")
    return loss_fn(lp, None if ref is None else ref.float(), adv, t["padding_mask"], **kw)
