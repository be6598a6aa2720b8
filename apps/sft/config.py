"""The SFT app's config (torchforge's apps/sft layout: model, dataset, trainer blocks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from forge.config import BuildReport, ConfigError, build
from forge.data.datasets import DatasetConfig
from forge.models.lora import LoraConfig
from forge.trainer.config import (
    CheckpointConfig,
    LRSchedulerConfig,
    OptimizerConfig,
    ParallelismConfig,
    TrainingConfig,
)


@dataclass
class TinyModel:
    """A random-init tiny model (`model: tiny`) for CPU runs and the embedded default."""

    family: str = "qwen2"
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    seed: int = 0


@dataclass
class EvalSection:
    every: int = 100  # steps between evaluations (0: only before and after)
    split: str = "test"
    num_samples: int = 200  # held-out prompts for accuracy (and eval loss)
    max_tokens: int = 16  # generation budget per answer


@dataclass
class TrainerSection:
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=3e-3))
    lr_scheduler: LRSchedulerConfig = field(default_factory=lambda: LRSchedulerConfig(warmup_steps=50))
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(dtype="float32"))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # torchforge's top-level `parallelism`: tensor_parallel_degree x data_parallel_shard_degree = procs
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)


@dataclass
class SFTConfig:
    model: str = "tiny"  # a local HF directory, hf://org/name (local cache) or `tiny`
    tiny: TinyModel = field(default_factory=TinyModel)
    # LoRA adapters instead of full fine-tuning, e.g. {r: 32, alpha: 64, target_modules: all-linear} (null: full)
    lora: LoraConfig | None = None
    seed: int = 0
    steps: int = 400
    batch_size: int = 64  # sequences per optimizer step
    max_seq_len: int = 2048  # longer examples are truncated (their completion tokens last)
    output_dir: str = "outputs/sft"
    dataset: dict[str, Any] = field(default_factory=lambda: {"task": "arithmetic", "task_kwargs": {"difficulty": 2}})
    eval: EvalSection = field(default_factory=EvalSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    export_hf: bool = True
    # trainer processes: 1 trains here; N > 1 runs a forge Trainer actor of N processes (FSDP2
    # across them, gloo on CPU / NCCL on GPUs) with Monarch (the `monarch` extra)
    procs: int = 1
    with_gpus: bool = True  # one GPU per trainer process when GPUs are visible (else CPU)
    metric_logging: dict[str, Any] = field(default_factory=lambda: {"console": {"every": 50}, "jsonl": {}})

    def __post_init__(self) -> None:
        from forge.observability.loggers import validate_metric_logging

        validate_metric_logging(self.metric_logging)
        if not isinstance(self.procs, int) or self.procs < 1:
            raise ConfigError(f"'procs: {self.procs!r}': expected a positive number of trainer processes")
        try:
            self.trainer.parallelism.resolve(self.procs)
        except ValueError as e:
            raise ConfigError(f"trainer.{e} (procs: {self.procs})") from None  # a typo fails at start, with the closest key


def load_sft_config(data: dict[str, Any]) -> tuple[SFTConfig, BuildReport]:
    from apps.grpo.compat import normalize_torchforge_sft  # the one torchforge translation table

    report = BuildReport()
    try:
        data, moved, unused, notes = normalize_torchforge_sft(data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    report.unused.extend(unused)
    report.notes.extend(notes)
    cfg = build(SFTConfig, data, report=report)
    report.unused.extend(f"(moved) {m}" for m in moved)
    ds = dict(cfg.dataset)
    if "data_split" in ds:
        ds["split"] = ds.pop("data_split")
    build(DatasetConfig, ds, path="dataset", report=report)  # names a wrong dataset key at start
    cfg.dataset = ds
    return cfg, report
