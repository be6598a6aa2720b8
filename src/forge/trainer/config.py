"""Trainer configuration: typed blocks, built from torchforge's `trainer:` YAML layout.

    trainer:
      model: {path: /ckpt/Qwen2.5-0.5B}          # or {tiny: qwen2, seed: 0}, or a bare path string
        # lora: {r: 32, alpha: 64, target_modules: all-linear}   # optional: train adapters only
      loss: grpo                                  # anything forge.losses.build_loss accepts
      optimizer: {name: AdamW, lr: 1e-5, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.0}
      lr_scheduler: {warmup_steps: 10, decay: cosine, total_steps: 1000, min_lr_ratio: 0.1}
      training: {max_tokens_per_microbatch: 8192, max_norm: 1.0, dtype: bfloat16, temperature: 1.0}
      checkpoint: {dir: ./ckpt, interval: 100, keep_last_n: 3, resume: true}
      compile: {enable: false}
      activation_checkpoint: {mode: none}          # none | full
      parallelism: {tensor_parallel_degree: 1, data_parallel_shard_degree: -1}   # TP x FSDP over the procs

Unknown keys are collected in `TrainerConfig.unused` so the caller can report them once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from forge.config.compat import TORCHTITAN_TRAINER_KEYS
from forge.models.lora import LoraConfig


@dataclass
class OptimizerConfig:
    name: str = "AdamW"
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def validate(self) -> None:
        if self.name.lower() != "adamw":
            raise ValueError(f"optimizer.name: only AdamW is supported, got {self.name!r}")
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas must be two numbers in [0, 1), got {self.betas}")


@dataclass
class LRSchedulerConfig:
    warmup_steps: int = 0
    decay: str = "constant"  # constant | linear | cosine
    total_steps: int | None = None  # needed by linear / cosine
    min_lr_ratio: float = 0.0

    def validate(self) -> None:
        if self.decay not in ("constant", "linear", "cosine"):
            raise ValueError(f"lr_scheduler.decay must be constant|linear|cosine, got {self.decay!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"lr_scheduler.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay != "constant" and not self.total_steps:
            raise ValueError(f"lr_scheduler.decay={self.decay} needs lr_scheduler.total_steps")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"lr_scheduler.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainingConfig:
    max_tokens_per_microbatch: int = 8192  # packing budget: real tokens per micro-batch row
    max_norm: float | None = 1.0  # grad-norm clip (None or <= 0: off, norm still reported)
    dtype: str = "bfloat16"  # autocast dtype on GPU; CPU always trains in float32
    temperature: float = 1.0  # the generator's sampling temperature: logprobs are taken at it
    compile: bool = False
    activation_checkpoint: bool = False
    # tokens per lm_head chunk (bounds the [N, V] logits; >= a micro-batch keeps logits instead of recomputing)
    logprob_chunk_size: int = 8192
    pad_id: int | None = None  # to find left padding when a batch carries no prompt_mask
    seed: int = 0

    def validate(self) -> None:
        if self.max_tokens_per_microbatch < 2:
            raise ValueError(f"training.max_tokens_per_microbatch must be >= 2, got {self.max_tokens_per_microbatch}")
        if self.temperature <= 0:
            raise ValueError(f"training.temperature must be > 0, got {self.temperature}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"training.dtype must be bfloat16|float16|float32, got {self.dtype!r}")


@dataclass
class CheckpointConfig:
    dir: str | None = None
    interval: int = 0  # save every k steps (0: only when asked)
    keep_last_n: int | None = None
    resume: bool = False  # resume from the newest complete checkpoint in `dir` at setup


@dataclass
class ParallelismConfig:
    """torchtitan's `parallelism` block, for the procs of one trainer replica.

    The procs form a 2-D mesh `("dp_shard", "tp")`: FSDP2 shards over `dp_shard`, tensor
    parallelism splits heads / MLP columns / vocabulary over `tp`. `data_parallel_shard_degree: -1`
    means "the procs left over" (procs // tp). The other torchtitan degrees must be 1 (forge has no
    pipeline, context, expert or replicated-data parallelism): anything else is an error, never ignored.
    """

    tensor_parallel_degree: int = 1
    data_parallel_shard_degree: int = -1
    pipeline_parallel_degree: int = 1
    data_parallel_replicate_degree: int = 1
    context_parallel_degree: int = 1
    expert_parallel_degree: int = 1
    disable_loss_parallel: bool = False  # True: gather the whole lm_head for the logprobs instead of a vocab-parallel softmax
    # TP > 1: the residual stream and the norms split over the sequence (torchtitan's default); False: replicated
    enable_sequence_parallel: bool = True

    def validate(self) -> None:
        tp, dp = self.tensor_parallel_degree, self.data_parallel_shard_degree
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"parallelism.tensor_parallel_degree must be an integer >= 1, got {tp!r}")
        if not isinstance(dp, int) or (dp < 1 and dp != -1):
            raise ValueError(f"parallelism.data_parallel_shard_degree must be an integer >= 1 or -1 (the rest), got {dp!r}")
        for key in ("pipeline_parallel_degree", "data_parallel_replicate_degree", "context_parallel_degree",
                    "expert_parallel_degree"):
            v = getattr(self, key)
            if v != 1:
                raise ValueError(f"parallelism.{key}: {v!r}: forge's trainer supports only 1 (no "
                                 f"{key.removesuffix('_degree').replace('_', ' ')} yet); the trainer's procs are "
                                 "split as tensor_parallel_degree x data_parallel_shard_degree")

    def resolve(self, world_size: int) -> tuple[int, int]:
        """(dp_shard, tp) for a replica of `world_size` procs, or an error naming the numbers."""
        self.validate()
        tp, dp = self.tensor_parallel_degree, self.data_parallel_shard_degree
        if world_size % tp:
            raise ValueError(f"parallelism.tensor_parallel_degree={tp} does not divide the trainer's {world_size} procs")
        if dp == -1:
            dp = world_size // tp
        if dp * tp != world_size:
            raise ValueError(f"parallelism: data_parallel_shard_degree={dp} x tensor_parallel_degree={tp} = {dp * tp}, "
                             f"but the trainer has {world_size} procs (they must be equal; -1 means the rest)")
        return dp, tp


@dataclass
class TrainerConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"tiny": "qwen2", "seed": 0})
    loss: Any = "grpo"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoraConfig | None = None  # `model.lora`: train LoRA adapters on the frozen model (forge.models.lora)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    unused: list[str] = field(default_factory=list)

    def validate(self) -> None:
        self.optimizer.validate()
        self.lr_scheduler.validate()
        self.training.validate()
        self.parallelism.validate()
        if not ("path" in self.model or "tiny" in self.model):
            raise ValueError(f"trainer.model needs `path` (HF directory) or `tiny` (family), got {self.model}")

    @classmethod
    def from_dict(cls, cfg: dict[str, Any] | None) -> TrainerConfig:
        """Accept forge's and torchforge's trainer blocks (`trainer.{model,optimizer,lr_scheduler,
        training,parallelism,checkpoint,activation_checkpoint,compile}`)."""
        cfg = dict(_plain(cfg or {}))
        unused: list[str] = []
        out = cls()
        ck = cfg.get("checkpoint")
        if isinstance(ck, dict) and "enable" in ck:  # torchtitan's switch: off means no checkpoint dir
            ck = cfg["checkpoint"] = dict(ck)
            if not ck.pop("enable"):
                ck.pop("dir", None)
                ck.pop("folder", None)
        _torchtitan_names(cfg, unused)
        model = cfg.pop("model", None)
        if isinstance(model, str):
            out.model = {"path": model}
        elif isinstance(model, dict):
            out.model = dict(model)
            lora = out.model.pop("lora", None)
            if lora is not None:
                out.lora = LoraConfig.from_dict(lora, where="trainer.model.lora")
        if "loss" in cfg:
            out.loss = cfg.pop("loss")
        out.optimizer = _fill(OptimizerConfig, cfg.pop("optimizer", {}), "optimizer", unused)
        out.optimizer.betas = tuple(out.optimizer.betas)  # type: ignore[assignment]
        sched = dict(cfg.pop("lr_scheduler", {}) or {})
        if "warmup_steps" not in sched and "warmup_ratio" in sched and sched.get("total_steps"):
            sched["warmup_steps"] = int(sched.pop("warmup_ratio") * sched["total_steps"])
        out.lr_scheduler = _fill(LRSchedulerConfig, sched, "lr_scheduler", unused)
        training = dict(cfg.pop("training", {}) or {})
        out.training = _fill(TrainingConfig, training, "training", unused)
        out.training = with_switches(out.training, cfg.pop("compile", None), cfg.pop("activation_checkpoint", None))
        ck = dict(cfg.pop("checkpoint", {}) or {})
        out.checkpoint = _fill(CheckpointConfig, ck, "checkpoint", unused)
        out.parallelism = _fill(ParallelismConfig, cfg.pop("parallelism", {}), "parallelism", unused)
        unused.extend(sorted(cfg))
        out.unused = unused
        out.validate()
        return out


def with_switches(training: TrainingConfig, compile: Any = None, activation_checkpoint: Any = None) -> TrainingConfig:
    """`training` with torchtitan's top-level switches applied: `compile: {enable: bool}` (or a bool) and
    `activation_checkpoint: {mode: none | full | selective}` (or a bool); None leaves the field as it is."""
    changes: dict[str, bool] = {}
    if isinstance(compile, dict):
        changes["compile"] = bool(compile.get("enable", False))
    elif compile is not None:
        changes["compile"] = bool(compile)
    if isinstance(activation_checkpoint, dict):
        changes["activation_checkpoint"] = activation_checkpoint.get("mode", "none") not in ("none", None, False)
    elif activation_checkpoint is not None:
        changes["activation_checkpoint"] = bool(activation_checkpoint)
    return replace(training, **changes) if changes else training


def _torchtitan_names(cfg: dict[str, Any], unused: list[str]) -> None:
    """torchtitan's keys in the trainer blocks -> forge's (forge.config.compat's table, the one the
    apps read): renamed (both names given must agree), or reported as unused."""
    for key, rule in TORCHTITAN_TRAINER_KEYS.items():
        block, k = key.split(".")
        sub = cfg.get(block)
        if not isinstance(sub, dict) or k not in sub or rule.dest == key:
            continue
        sub = cfg[block] = dict(sub)
        value = sub.pop(k)
        dblock, _, dk = (rule.dest or "").partition(".")
        if rule.dest is None or dblock != block:  # not used, or a key the app places (steps, ...)
            unused.append(key)
        elif dk in sub and sub[dk] != rule.value(value):
            raise ValueError(f"trainer.{key}={value!r} (torchtitan's name) and trainer.{rule.dest}={sub[dk]!r} "
                             "disagree: give one")
        else:
            sub[dk] = rule.value(value)


def _plain(x: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(x, (DictConfig, ListConfig)):
            return OmegaConf.to_container(x, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return x


def _fill(cls: type, values: Any, block: str, unused: list[str]) -> Any:
    if values is None:
        return cls()
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ValueError(f"trainer.{block} must be a mapping, got {type(values).__name__}")
    names = {f.name for f in fields(cls)}
    unused.extend(f"{block}.{k}" for k in values if k not in names)
    return cls(**{k: v for k, v in values.items() if k in names})
