"""The GRPO app's config: torchforge's apps/grpo layout (qwen3_1_7b.yaml), plus forge's own keys.

Top-level and placement keys are typed here; the `dataset`, `policy`, `trainer` and `ref_model`
blocks are validated against the typed configs of the parts that consume them (forge.data,
forge.engine, forge.trainer), so every wrong key fails at start with its full dotted path and
the closest valid key. Keys that torchforge configs carry but forge has no use for (vLLM/
torchtitan knobs such as `tensor_parallel_size` or `gc_freq`) are accepted and reported once.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from forge.config import BuildReport, ConfigError, build
from forge.data.datasets import DatasetConfig
from forge.engine.config import EngineConfig, SamplingParams
from forge.trainer.config import (
    CheckpointConfig,
    LRSchedulerConfig,
    OptimizerConfig,
    TrainingConfig,
)


@dataclass
class Placement:
    """Where a service/actor runs: `Cls.options(**placement)`."""

    procs: int = 1
    num_replicas: int = 1
    with_gpus: bool = False
    mesh_name: str | None = None
    hosts: int | None = None
    timeout_s: float = 1800.0
    max_retries: int = 2


@dataclass
class Services:
    policy: Placement = field(default_factory=Placement)
    ref_model: Placement = field(default_factory=Placement)
    reward_actor: Placement = field(default_factory=Placement)


@dataclass
class Actors:
    dataset: Placement = field(default_factory=Placement)
    trainer: Placement = field(default_factory=Placement)
    replay_buffer: Placement = field(default_factory=Placement)
    compute_advantages: Placement = field(default_factory=Placement)


@dataclass
class Policy:
    engine_args: dict[str, Any] = field(default_factory=dict)  # forge EngineConfig keys (+ vLLM's, ignored)
    sampling_params: dict[str, Any] = field(default_factory=dict)  # SamplingParams keys


@dataclass
class ReplayBufferSection:
    batch_size: int | None = None  # default: local_batch_size
    max_policy_age: int | None = None  # default: off_by_n
    dp_size: int = 1
    max_buffer_size: int | None = None
    max_resample_count: int = 0
    seed: int | None = None


@dataclass
class AdvantageSection:
    method: str = "grpo"  # grpo | drgrpo | rloo | reinforce_pp | reinforce_pp_response | opo | passk | reinforce | gpg
    options: dict[str, Any] = field(default_factory=dict)  # e.g. {eps: 1e-4}
    filter_zero_variance: bool = False  # DAPO dynamic sampling: drop groups whose rewards are all equal


@dataclass
class RewardSection:
    """How the reward actor runs the `rewards`, and when its failures stop the run."""

    timeout_s: float = 10.0  # per reward call; a call past it is stopped and counted as an infrastructure failure
    isolation: str = "process"  # process (a hung call's worker is killed) | thread (cannot be stopped)
    workers: int = 2  # reward worker processes per reward replica (isolation: process)
    max_infra_error_fraction: float = 0.5  # more failed episodes than this in a step's worth stops the run

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_infra_error_fraction <= 1.0:
            raise ValueError(f"reward.max_infra_error_fraction must be in [0, 1], got {self.max_infra_error_fraction}")


@dataclass
class EvalSection:
    every: int = 0  # steps between held-out evaluations (0: only before and after training)
    num_samples: int = 200
    split: str = "test"
    temperature: float = 0.0  # greedy
    correct_reward: str | None = None  # breakdown key that means "correct" (default: the first reward)


@dataclass
class WarmupSection:
    """SFT warm-up that produces the embedded default's starting model (`model: tiny-sft`)."""

    steps: int = 600
    lr: float = 3.0e-3
    batch_size: int = 64
    family: str = "qwen2"
    hidden_size: int = 128
    num_hidden_layers: int = 4
    cache_dir: str = ".cache/forge"


@dataclass
class TrainerSection:
    model: Any = None  # default: top-level `model`
    loss: Any = None  # default: top-level `loss`
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallelism: dict[str, Any] = field(default_factory=dict)
    compile: Any = None
    activation_checkpoint: Any = None
    weight_sync: dict[str, Any] = field(default_factory=dict)
    IGNORED_KEYS: ClassVar[frozenset[str]] = frozenset({"use_dcp"})


@dataclass
class RefModelSection:
    model: Any = None
    training: dict[str, Any] = field(default_factory=dict)
    compile: Any = None
    parallelism: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] = field(default_factory=dict)


@dataclass
class GRPOConfig:
    model: str = "tiny-sft"  # a local HF directory, hf://org/name (local cache), or tiny-sft
    seed: int = 0
    provisioner: Any = "local"  # local | monarch (or {kind: monarch, ...})
    group_size: int = 8
    local_batch_size: int = 32  # episodes per training step (per data-parallel rank)
    prompts_per_step: int | None = None  # alternative to local_batch_size: groups per step
    max_req_tokens: int = 512
    max_res_tokens: int = 512
    off_by_n: int = 1  # max policy age of trained episodes: 0 = on-policy, >=1 = async
    rollout_threads: int = 1  # concurrent rollout loops
    sync_interval: int = 1  # push weights every k steps
    steps: int | None = None  # default: trainer.training.steps or 100
    output_dir: str = "outputs/grpo"
    checkpoint_interval: int = 0  # 0: only at the end
    samples_every: int = 5  # write example completions every k steps
    loss: Any = field(default_factory=lambda: {"name": "grpo", "beta": 0.0})
    rewards: list[Any] = field(default_factory=lambda: [{"name": "math"}])
    reward: RewardSection = field(default_factory=RewardSection)
    advantage: AdvantageSection = field(default_factory=AdvantageSection)
    dataset: dict[str, Any] = field(default_factory=dict)
    policy: Policy = field(default_factory=Policy)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    ref_model: RefModelSection = field(default_factory=RefModelSection)
    replay_buffer: ReplayBufferSection = field(default_factory=ReplayBufferSection)
    eval: EvalSection = field(default_factory=EvalSection)
    warmup: WarmupSection = field(default_factory=WarmupSection)
    metric_logging: dict[str, Any] = field(default_factory=lambda: {"console": {}, "jsonl": {}})
    services: Services = field(default_factory=Services)
    actors: Actors = field(default_factory=Actors)
    env: dict[str, Any] | None = None  # agentic rollouts (forge.envs) instead of single answers


def episodes_per_step(cfg: GRPOConfig) -> int:
    """Episodes per training step per data-parallel rank (what the replay buffer batches)."""
    if cfg.replay_buffer.batch_size:
        return cfg.replay_buffer.batch_size
    if cfg.prompts_per_step:
        return cfg.prompts_per_step * cfg.group_size
    return cfg.local_batch_size


# torchforge / vLLM / torchtitan keys that forge accepts and does not use (reported once)
_IGNORED_ENGINE_ARGS = {
    "model", "tensor_parallel_size", "pipeline_parallel_size", "enforce_eager", "gpu_memory_utilization",
    "max_model_len", "dtype", "trust_remote_code", "disable_custom_all_reduce", "enable_prefix_caching",
    "data_parallel_size", "max_num_seqs", "max_num_batched_tokens", "seed",
}
_IGNORED_TITAN = {
    "training": {"local_batch_size", "seq_len", "steps", "gc_freq", "mixed_precision_param", "mixed_precision_reduce",
                 "gradient_accumulation_steps", "max_grad_norm"},
    "checkpoint": {"enable", "initial_load_path", "initial_load_in_hf", "last_save_in_hf", "async_mode", "folder",
                   "load_step", "export_dtype", "keep_latest_k", "initial_load_model_only"},
    "model": {"name", "flavor", "hf_assets_path", "tokenizer_path", "converters"},
}


def _check_keys(section: dict[str, Any], valid: set[str], path: str, ignored: set[str], report: BuildReport) -> None:
    for key in list(section):
        if key in valid:
            continue
        if key in ignored:
            report.unused.append(f"{path}.{key}")
            continue
        close = difflib.get_close_matches(key, sorted(valid | ignored), n=1, cutoff=0.6)
        hint = f" — did you mean '{path}.{close[0]}'?" if close else ""
        raise ConfigError(f"unknown key '{path}.{key}'{hint} (valid keys here: {', '.join(sorted(valid))})")


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def validate_sections(cfg: GRPOConfig, report: BuildReport) -> None:
    """Check the dict-typed blocks against the configs of the parts that consume them."""
    ds = dict(cfg.dataset)
    ds.pop("model", None)  # torchforge's tokenizer source: forge takes it from top-level `model`
    if "data_split" in ds:
        ds["split"] = ds.pop("data_split")
    if "revision" in ds:
        ds["name"] = ds.pop("revision")
    build(DatasetConfig, ds, path="dataset", report=report)
    cfg.dataset = ds

    engine = dict(cfg.policy.engine_args)
    own = _fields(EngineConfig)
    _check_keys(engine, own, "policy.engine_args", _IGNORED_ENGINE_ARGS - own, report)
    build(EngineConfig, {k: v for k, v in engine.items() if k in own}, path="policy.engine_args", report=report)
    sp = _fields(SamplingParams)
    _check_keys(cfg.policy.sampling_params, sp, "policy.sampling_params", set(), report)
    build(SamplingParams, dict(cfg.policy.sampling_params), path="policy.sampling_params", report=report)


def load_grpo_config(data: dict[str, Any]) -> tuple[GRPOConfig, BuildReport]:
    from apps.grpo.compat import normalize_skill_schema

    data, moved = normalize_skill_schema(data)
    for extra in ("grpo_unknown", "training_unknown"):
        if extra in data:
            block = extra.split("_")[0]
            raise ConfigError(f"unknown key(s) {[f'{block}.{k}' for k in sorted(data[extra])]} in the "
                              f"torchforge skill schema's '{block}' block")
    report = BuildReport()
    # torchtitan keys inside trainer.training / trainer.checkpoint are legal in torchforge configs:
    # note them, carry over the few that mean something to forge, then drop them
    trainer = data.get("trainer")
    if isinstance(trainer, dict):
        for block, keys in _IGNORED_TITAN.items():
            sub = trainer.get(block)
            if block == "model" or not isinstance(sub, dict):
                continue
            own = _fields(TrainingConfig if block == "training" else CheckpointConfig)
            for k in [k for k in sub if k in keys and k not in own]:
                report.unused.append(f"trainer.{block}.{k}")
                if (block, k) == ("training", "steps") and data.get("steps") is None:
                    data["steps"] = sub[k]
                if (block, k) == ("checkpoint", "folder"):
                    sub.setdefault("dir", sub[k])
                if (block, k) == ("training", "max_grad_norm"):
                    sub.setdefault("max_norm", sub[k])
                del sub[k]
    cfg = build(GRPOConfig, data, report=report)
    validate_sections(cfg, report)
    if episodes_per_step(cfg) % cfg.group_size:
        raise ConfigError(f"local_batch_size/replay_buffer.batch_size ({episodes_per_step(cfg)}) must be a multiple "
                          f"of group_size ({cfg.group_size}): groups are never split across steps")
    report.unused.extend(f"(moved) {m}" for m in moved)
    return cfg, report
