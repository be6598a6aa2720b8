"""The GRPO app's config: torchforge's apps/grpo layout (qwen3_1_7b.yaml), plus forge's own keys.

Top-level and placement keys are typed here; the `dataset`, `policy`, `trainer` and `ref_model`
blocks are validated against the typed configs of the parts that consume them (forge.data,
forge.engine, forge.trainer), so every wrong key fails at start with its full dotted path and
the closest valid key. Keys that torchforge configs carry but forge has no use for (vLLM/
torchtitan knobs such as `pipeline_parallel_size` or `gc_freq`) are accepted and reported once.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from apps.grpo.compat import apply_torchforge_defaults, normalize_skill_schema
from forge.config import BuildReport, ConfigError, build
from forge.controller import ActorOptions
from forge.data.datasets import DatasetConfig
from forge.engine.config import EngineConfig, SamplingParams
from forge.models.lora import LoraConfig
from forge.observability.loggers import validate_metric_logging
from forge.trainer.config import (
    CheckpointConfig,
    LRSchedulerConfig,
    OptimizerConfig,
    TrainingConfig,
)


# Where each service/actor runs: `Cls.options(**asdict(placement))`. The controller's
# ActorOptions is the placement type; the config holds one per service and actor.
@dataclass
class ServicePlacements:
    policy: ActorOptions = field(default_factory=ActorOptions)
    ref_model: ActorOptions = field(default_factory=ActorOptions)
    reward_actor: ActorOptions = field(default_factory=ActorOptions)


@dataclass
class ActorPlacements:
    dataset: ActorOptions = field(default_factory=ActorOptions)
    trainer: ActorOptions = field(default_factory=ActorOptions)
    replay_buffer: ActorOptions = field(default_factory=ActorOptions)
    compute_advantages: ActorOptions = field(default_factory=ActorOptions)


@dataclass
class Policy:
    engine_args: dict[str, Any] = field(default_factory=dict)  # forge EngineConfig keys (+ vLLM's, ignored)
    sampling_params: dict[str, Any] = field(default_factory=dict)  # SamplingParams keys


@dataclass
class ReplayBufferSection:
    batch_size: int | None = None  # default: local_batch_size
    max_policy_age: int | None = None  # torchforge's name for off_by_n: give one, or both equal
    dp_size: int = 1
    max_buffer_size: int | None = None
    max_resample_count: int = 0
    seed: int | None = None


@dataclass
class AdvantageSection:
    method: str = "grpo"  # grpo | drgrpo | rloo | reinforce_pp | reinforce_pp_response | opo | passk | reinforce | gpg
    options: dict[str, Any] = field(default_factory=dict)  # e.g. {eps: 1e-4}
    filter_zero_variance: bool = False  # DAPO dynamic sampling: drop groups whose rewards are all equal
    # this many filtered groups in a row stop the run (constant rewards: nothing would ever train); 0: no bound
    max_consecutive_filtered: int = 200


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
class ModelSection:
    """`trainer.model` / `ref_model.model`: forge's keys and torchtitan's (torchforge configs)."""

    path: str | None = None  # an HF directory or hf://org/name; default: top-level `model`
    tiny: str | None = None  # a tiny random model of this family (tests)
    seed: int = 0
    hf_assets_path: str | None = None  # torchtitan's name for `path`
    name: str | None = None  # torchtitan: the architecture comes from the checkpoint's config.json
    flavor: str | None = None
    tokenizer_path: str | None = None
    converters: list[Any] = field(default_factory=list)


def model_spec(m: ModelSection | None) -> dict[str, Any] | None:
    """The spec the actors' `build_model` reads: `path` (or `tiny`), nothing else."""
    if m is None:
        return None
    if m.tiny:
        return {"tiny": m.tiny, "seed": m.seed}
    path = m.path or m.hf_assets_path
    return {"path": path} if path else None


@dataclass
class RefTrainingSection:
    dtype: str = "bfloat16"
    max_tokens_per_microbatch: int = 8192
    logprob_chunk_size: int = 1024
    seq_len: int | None = None  # torchtitan's; the reference model packs by max_tokens_per_microbatch
    gc_freq: int | None = None  # torchtitan's


def ref_training(cfg: "GRPOConfig") -> dict[str, Any]:
    """The ReferenceModel's `training` options (torchtitan's seq_len/gc_freq have no use there)."""
    t = dataclasses.asdict(cfg.ref_model.training)
    for k in ("seq_len", "gc_freq"):
        t.pop(k)
    return t


@dataclass
class ProvisionerSection:
    """`provisioner: local | monarch` or a mapping (forge: kind + MonarchProvisioner options;
    torchforge: `launcher`, refused: multi-host launch is not built)."""

    kind: str = "local"
    share_gpus: bool = False
    gpu_count: int | None = None
    poll_s: float = 0.2
    boot_timeout_s: float = 120.0
    stop_timeout_s: float = 10.0
    launcher: str | None = None
    IGNORED_KEYS: ClassVar[frozenset[str]] = frozenset({"job_name", "memMB", "cpu", "account", "qos", "gpus_per_node"})


@dataclass
class TrainerSection:
    model: ModelSection | None = None  # default: top-level `model`
    loss: Any = None  # default: top-level `loss`
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallelism: dict[str, Any] = field(default_factory=dict)
    compile: Any = None
    activation_checkpoint: Any = None
    weight_sync: dict[str, Any] = field(default_factory=dict)
    IGNORED_KEYS: ClassVar[frozenset[str]] = frozenset({"use_dcp", "dcp_path", "comm"})


@dataclass
class RefModelSection:
    model: ModelSection | None = None
    training: RefTrainingSection = field(default_factory=RefTrainingSection)
    compile: Any = None
    parallelism: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] = field(default_factory=dict)
    IGNORED_KEYS: ClassVar[frozenset[str]] = frozenset({"comm"})


@dataclass
class GRPOConfig:
    model: str = "tiny-sft"  # a local HF directory, hf://org/name (local cache), or tiny-sft
    # LoRA: the trainer trains adapters on the frozen `model` and syncs only them, e.g. {r: 32, alpha: 64,
    # target_modules: all-linear} (null: full fine-tuning). LoRA wants ~10x the full-FT learning rate
    lora: LoraConfig | None = None
    seed: int = 0
    provisioner: Any = "local"  # local | monarch (or {kind: monarch, ...})
    group_size: int = 8
    local_batch_size: int = 32  # episodes per training step (per data-parallel rank)
    prompts_per_step: int | None = None  # alternative to local_batch_size: groups per step
    max_req_tokens: int = 512
    max_res_tokens: int = 512
    off_by_n: int = 1  # max policy age of trained episodes: 0 = on-policy, >=1 = async (resolve_policy_age)
    rollout_threads: int = 1  # concurrent rollout loops
    sync_interval: int = 1  # push weights every k steps (needs off_by_n >= sync_interval - 1)
    steps: int | None = None  # default: trainer.training.steps or 100
    output_dir: str = "outputs/grpo"
    checkpoint_interval: int = 0  # 0: only at the end
    samples_every: int = 5  # write example completions every k steps
    batch_timeout_s: float = 1800.0  # training waits this long for a batch with no rollout group completing, then stops
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
    services: ServicePlacements = field(default_factory=ServicePlacements)
    actors: ActorPlacements = field(default_factory=ActorPlacements)
    env: dict[str, Any] | None = None  # agentic rollouts (forge.envs) instead of single answers


def episodes_per_step(cfg: GRPOConfig) -> int:
    """Episodes per training step per data-parallel rank (what the replay buffer batches)."""
    if cfg.replay_buffer.batch_size:
        return cfg.replay_buffer.batch_size
    if cfg.prompts_per_step:
        return cfg.prompts_per_step * cfg.group_size
    return cfg.local_batch_size


def groups_per_step(cfg: GRPOConfig) -> int:
    """Groups the rollouts must generate for one training step (all data-parallel ranks). When
    a step's episodes are not a multiple of group_size (torchforge's qwen3_8b: 12 and 8), the
    buffer fills the batch with episodes, not groups (as torchforge's does), so round up."""
    need = episodes_per_step(cfg) * cfg.replay_buffer.dp_size
    return -(-need // cfg.group_size)


def buffer_group_size(cfg: GRPOConfig) -> int | None:
    """Whole groups per batch when the batch holds whole groups; else episodes fill it."""
    need = episodes_per_step(cfg) * cfg.replay_buffer.dp_size
    return cfg.group_size if need % cfg.group_size == 0 else None




# torchforge / vLLM / torchtitan keys that forge accepts and does not use (reported once)
_IGNORED_ENGINE_ARGS = {
    "model", "pipeline_parallel_size", "enforce_eager", "gpu_memory_utilization",
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


def resolve_policy_age(cfg: GRPOConfig, data: dict[str, Any], report: BuildReport) -> None:
    """One value bounds the age of trained episodes: `off_by_n` (forge's and torchforge's top-level
    key) or `replay_buffer.max_policy_age` (torchforge's name for the same bound). After this both
    hold it; the rollout gate (`rollout_ahead`) and the replay buffer read it.

    The generator's weights lag the trainer's by up to `sync_interval - 1` steps, so an age bound
    smaller than that would evict every episode generated between syncs: refused, not raised.
    """
    if cfg.sync_interval < 1:
        raise ConfigError(f"'sync_interval: {cfg.sync_interval}' must be >= 1 (push weights every k steps)")
    rb_age = cfg.replay_buffer.max_policy_age
    given = "off_by_n" in data
    if rb_age is not None and given and rb_age != cfg.off_by_n:
        raise ConfigError(
            f"'off_by_n: {cfg.off_by_n}' and 'replay_buffer.max_policy_age: {rb_age}' disagree: both bound the "
            "policy age of trained episodes (torchforge writes max_policy_age: ${off_by_n}); set one, or both equal")
    if rb_age is not None:
        cfg.off_by_n, key = rb_age, "replay_buffer.max_policy_age"
    elif given:
        key = "off_by_n"
    else:  # neither given: the default run-ahead of one step, plus the lag between weight syncs
        key = None
        cfg.off_by_n = 1 + cfg.sync_interval - 1
        if cfg.sync_interval > 1:
            report.notes.append(
                f"off_by_n not set: {cfg.off_by_n} (one step of run-ahead plus sync_interval {cfg.sync_interval} - 1 "
                "steps of weight lag)")
    if cfg.off_by_n < 0:
        raise ConfigError(f"'{key}: {cfg.off_by_n}' must be >= 0 (0: on-policy)")
    if key is not None and cfg.off_by_n < cfg.sync_interval - 1:
        raise ConfigError(
            f"'{key}: {cfg.off_by_n}' is smaller than 'sync_interval: {cfg.sync_interval}' - 1: the generator's "
            f"weights lag the trainer's by up to {cfg.sync_interval - 1} steps, so every episode generated between "
            f"syncs would be too old to train on. Set {key} >= {cfg.sync_interval - 1} or lower sync_interval")
    cfg.replay_buffer.max_policy_age = cfg.off_by_n


def rollout_ahead(cfg: GRPOConfig) -> int:
    """Steps of rollouts that may run ahead of training: the age bound less the weight-sync lag,
    so an episode is at most `off_by_n` versions old when trained on."""
    return cfg.off_by_n - (cfg.sync_interval - 1)


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
    validate_metric_logging(cfg.metric_logging, path="metric_logging")
    _validate_loss(cfg.trainer.loss if cfg.trainer.loss is not None else cfg.loss,
                   "trainer.loss" if cfg.trainer.loss is not None else "loss")
    _validate_placement(cfg)


def _validate_loss(spec: Any, path: str) -> None:
    """Build the loss once at start: a wrong name or keyword fails here, not after start-up."""
    from forge.losses import build_loss

    try:
        build_loss(spec)
    except (TypeError, ValueError, ImportError, AttributeError, KeyError) as e:
        raise ConfigError(f"'{path}': {e}") from None


def provisioner_section(cfg: GRPOConfig) -> ProvisionerSection:
    p = cfg.provisioner
    return build(ProvisionerSection, {"kind": p} if isinstance(p, str) else p, path="provisioner")


def _validate_placement(cfg: GRPOConfig) -> None:
    """Placements forge cannot run fail here, before any service starts."""
    prov = provisioner_section(cfg)
    if prov.kind not in ("local", "monarch"):
        raise ConfigError(f"'provisioner' must be local or monarch (or {{kind: ..., ...}}), got {prov.kind!r}")
    if prov.launcher not in (None, "local"):
        raise ConfigError(
            f"provisioner.launcher: {prov.launcher!r} asks for a multi-host job; forge runs on one host for now "
            "(provisioner: local, or monarch for one process per service on this host's GPUs). Remove "
            "provisioner.launcher (and `hosts`) to run on one host")
    for name, p in [*vars(cfg.services).items(), *vars(cfg.actors).items()]:
        try:  # the checks `.options()` makes at start-up, here with the config path
            p.validate(_placement_path(cfg, name))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if p.hosts not in (None, 0, 1):
            raise ConfigError(f"'{_placement_path(cfg, name)}.hosts: {p.hosts}': forge runs on one host for now")
    # the generator runs tensor-parallel over its replica's procs (forge.engine.tp): one rank per proc
    procs, tp = cfg.services.policy.procs, cfg.policy.engine_args.get("tensor_parallel_size", 1)
    if procs != tp:
        raise ConfigError(
            f"'services.policy.procs: {procs}' must equal 'policy.engine_args.tensor_parallel_size: {tp}': a generator "
            "replica runs its engine tensor-parallel, one rank per proc (torchforge's layout: "
            "procs: ${policy.engine_args.tensor_parallel_size}); num_replicas gives more engines")
    if procs > 1 and prov.kind == "local":
        raise ConfigError(
            f"'services.policy.procs: {procs}' (tensor_parallel_size {tp}) needs one process per rank: use "
            "provisioner: monarch; the local provisioner runs everything in this process")
    if prov.kind == "local":
        for path, p in (("actors.trainer", cfg.actors.trainer), ("services.ref_model", cfg.services.ref_model)):
            if p.procs != 1:
                raise ConfigError(
                    f"'{path}.procs: {p.procs}' needs one process per rank (FSDP): use provisioner: monarch; "
                    "the local provisioner runs everything in this process")


def _placement_path(cfg: GRPOConfig, name: str) -> str:
    return f"services.{name}" if hasattr(cfg.services, name) else f"actors.{name}"


def _check_held_out(cfg: GRPOConfig, report: BuildReport) -> None:
    """Held-out evaluation reads `eval.split` of `dataset.path`. A path without that split would
    hand back the training files (a directory's files are all taken when none matches the split):
    that is no held-out set, so evaluate nothing and say so."""
    ds = cfg.dataset
    if cfg.env is not None or ds.get("task") or not ds.get("path") or cfg.eval.num_samples <= 0:
        return
    from forge.data.sources import resolve_data_files

    try:
        train = set(resolve_data_files(ds["path"], ds.get("split", "train"), ds.get("name")))
        held = set(resolve_data_files(ds["path"], cfg.eval.split, ds.get("name")))
    except OSError:  # a missing path fails when the dataset loads, with the dataset's own message
        return
    if held & train:
        report.notes.append(
            f"no held-out evaluation: dataset.path '{ds['path']}' has no '{cfg.eval.split}' split apart from the "
            f"training rows (eval.num_samples {cfg.eval.num_samples} -> 0); point eval.split at a split the path holds "
            "(files named <split>*, or a <split>/ folder) to evaluate")
        cfg.eval.num_samples = 0


def load_grpo_config(data: dict[str, Any]) -> tuple[GRPOConfig, BuildReport]:
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
    apply_torchforge_defaults(data, report.notes)
    cfg = build(GRPOConfig, data, report=report)
    resolve_policy_age(cfg, data, report)
    validate_sections(cfg, report)
    _check_held_out(cfg, report)
    if buffer_group_size(cfg) is None:
        report.notes.append(
            f"a step's {episodes_per_step(cfg) * cfg.replay_buffer.dp_size} episodes are not a multiple of "
            f"group_size {cfg.group_size}: episodes, not whole groups, fill each batch (torchforge's meaning); "
            f"rollouts generate {groups_per_step(cfg)} groups per step")
    report.unused.extend(f"(moved) {m}" for m in moved)
    return cfg, report
