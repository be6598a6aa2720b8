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
from forge.config.compat import (
    APP,
    ENGINE_ARGS_MODEL,
    TORCHTITAN_TRAINER_KEYS,
    VLLM_ENGINE_ARGS,
    Rename,
    translate_engine_args,
    translate_sampling_params,
)
from forge.controller import ActorOptions
from forge.controller.hosts import JobConfig
from forge.data.datasets import DatasetConfig
from forge.engine.config import EngineConfig, SamplingParams
from forge.models.lora import LoraConfig
from forge.observability.loggers import validate_metric_logging
from forge.trainer.config import (
    CheckpointConfig,
    LRSchedulerConfig,
    OptimizerConfig,
    ParallelismConfig,
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
    """`ref_model.model`: the reference model's weights, when not the top-level `model`
    (torchtitan's keys in it are translated by forge.config.compat before this is built)."""

    path: str | None = None  # an HF directory or hf://org/name; default: top-level `model`
    tiny: str | None = None  # a tiny random model of this family (tests)
    seed: int = 0


def model_spec(m: ModelSection | None) -> dict[str, Any] | None:
    """The spec the actors' `build_model` reads: `path` (or `tiny`), nothing else."""
    if m is None:
        return None
    if m.tiny:
        return {"tiny": m.tiny, "seed": m.seed}
    return {"path": m.path} if m.path else None


@dataclass
class RefTrainingSection:
    dtype: str = "bfloat16"
    max_tokens_per_microbatch: int = 8192
    logprob_chunk_size: int = 1024
    # torchtitan's keys here (seq_len, gc_freq, ...) go through forge.config.compat: reported as unused


def ref_training(cfg: GRPOConfig) -> dict[str, Any]:
    """The ReferenceModel's `training` options."""
    return dataclasses.asdict(cfg.ref_model.training)


@dataclass
class ProvisionerSection(JobConfig):
    """`provisioner: local | monarch` or a mapping: `kind` + MonarchProvisioner options, and the
    hosts (forge.controller.hosts.JobConfig: `job: process | attach | slurm | kubernetes` and the
    keys each takes). torchforge's `launcher: slurm` (with job_name, account, qos, gpus_per_node,
    cpu, memMB) is `kind: monarch, job: slurm`, a host group per service with `hosts` (torchforge_meshes)."""

    kind: str = "local"
    share_gpus: bool = False
    gpu_count: int | None = None
    poll_s: float = 0.2
    boot_timeout_s: float = 120.0
    stop_timeout_s: float = 10.0
    launcher: str | None = None  # torchforge: slurm | mast | local
    cpu: int | None = None  # torchforge's cpus per task
    memMB: int | None = None  # torchforge's name


@dataclass
class TrainerSection:
    # `trainer.model` (torchforge writes the top-level model there) is read by load_grpo_config:
    # the trainer trains the top-level `model`, a different one is refused
    loss: Any = None  # default: top-level `loss`
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # tensor_parallel_degree x data_parallel_shard_degree must equal the trainer's ranks (actors.trainer.procs x hosts)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    compile: Any = None
    activation_checkpoint: Any = None
    weight_sync: dict[str, Any] = field(default_factory=dict)
    IGNORED_KEYS: ClassVar[frozenset[str]] = frozenset({"use_dcp", "dcp_path", "comm"})


@dataclass
class RefModelSection:
    model: ModelSection | None = None
    training: RefTrainingSection = field(default_factory=RefTrainingSection)
    # the reference model runs one process per replica, unsharded: `parallelism` is checked to ask
    # for nothing else (a TP degree there is refused); its other torchforge blocks nothing reads
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    IGNORED_KEYS: ClassVar[frozenset[str]] = frozenset({"comm", "compile", "checkpoint"})


@dataclass
class GRPOConfig:
    model: str = "tiny-sft"  # a local HF directory, hf://org/name (local cache), or tiny-sft
    # LoRA: the trainer trains adapters on the frozen `model` and syncs only them, e.g. {r: 32, alpha: 64,
    # target_modules: all-linear} (null: full fine-tuning). LoRA wants ~10x the full-FT learning rate
    lora: LoraConfig | None = None
    seed: int = 0
    provisioner: Any = "local"  # local | monarch, or {kind: monarch, job: process | attach | slurm | kubernetes, hosts: N, ...}
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
    if "model" in ds:  # torchforge's tokenizer source (${model}): forge's is the top-level `model`
        if not same_model(ds["model"], cfg.model):
            raise ConfigError(f"'dataset.model: {ds['model']}' differs from 'model: {cfg.model}': prompts are "
                              "tokenized with the model's tokenizer; remove dataset.model or set it to ${model}")
        ds.pop("model")
    if "data_split" in ds:
        ds["split"] = ds.pop("data_split")
    if "revision" in ds:
        ds["name"] = ds.pop("revision")
    build(DatasetConfig, ds, path="dataset", report=report)
    cfg.dataset = ds

    cfg.policy.engine_args = engine_config_args(cfg, report)
    build(EngineConfig, dict(cfg.policy.engine_args), path="policy.engine_args", report=report)
    sampling = translate_sampling_params(cfg.policy.sampling_params)
    _check_keys(sampling, _fields(SamplingParams), "policy.sampling_params", set(), report)
    build(SamplingParams, dict(sampling), path="policy.sampling_params", report=report)
    cfg.policy.sampling_params = sampling
    validate_metric_logging(cfg.metric_logging, path="metric_logging")
    _validate_loss(cfg.trainer.loss if cfg.trainer.loss is not None else cfg.loss,
                   "trainer.loss" if cfg.trainer.loss is not None else "loss")
    _validate_placement(cfg)


def same_model(a: Any, b: Any) -> bool:
    """torchforge configs repeat the top-level model as `hf://${model}` or `${model}`."""
    return str(a).removeprefix("hf://") == str(b).removeprefix("hf://")


def engine_config_args(cfg: GRPOConfig, report: BuildReport) -> dict[str, Any]:
    """`policy.engine_args` (forge's EngineConfig keys and vLLM's) -> EngineConfig keys, through
    forge.config.compat's table, the one the Generator's `engine_args=` reads: a vLLM key forge
    maps (gpu_memory_utilization, enforce_eager, ...) is honoured, one it has no use for is
    reported as unused, any other key is an error naming the closest valid one."""
    own = _fields(EngineConfig)
    given = dict(cfg.policy.engine_args)
    foreign = {k: v for k, v in given.items() if k not in own}
    for key in foreign:
        if key not in VLLM_ENGINE_ARGS:
            close = difflib.get_close_matches(key, sorted(own | set(VLLM_ENGINE_ARGS)), n=1, cutoff=0.6)
            hint = f" — did you mean 'policy.engine_args.{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key 'policy.engine_args.{key}'{hint} (valid keys here: forge's "
                              f"{', '.join(sorted(own))}; vLLM's {', '.join(sorted(VLLM_ENGINE_ARGS))})")
    if ENGINE_ARGS_MODEL in foreign and not same_model(foreign[ENGINE_ARGS_MODEL], cfg.model):
        raise ConfigError(
            f"'policy.engine_args.model: {foreign[ENGINE_ARGS_MODEL]}' differs from 'model: {cfg.model}': the "
            "generator serves the top-level model (the one the trainer trains); remove policy.engine_args.model "
            "or set it to ${model}")
    try:
        mapped, unused = translate_engine_args(foreign)
    except ValueError as e:  # a value forge cannot honour (pipeline_parallel_size: 2, ...)
        raise ConfigError(f"policy.{e}") from e
    report.unused.extend(f"policy.engine_args.{k}" for k in unused)
    out = {k: v for k, v in given.items() if k in own}
    for dest, v in mapped.items():
        src = next(k for k, r in VLLM_ENGINE_ARGS.items() if r.dest == dest and k in foreign)
        if dest in out and dest != src and out[dest] != v:
            raise ConfigError(
                f"'policy.engine_args.{src}: {foreign[src]}' (vLLM's name) and 'policy.engine_args.{dest}: "
                f"{out[dest]}' (forge's) disagree: they set the same engine option; give one")
        out.setdefault(dest, v)
    return out


def _validate_loss(spec: Any, path: str) -> None:
    """Build the loss once at start: a wrong name or keyword fails here, not after start-up."""
    from forge.losses import build_loss

    try:
        build_loss(spec)
    except (TypeError, ValueError, ImportError, AttributeError, KeyError) as e:
        raise ConfigError(f"'{path}': {e}") from None


def provisioner_section(cfg: GRPOConfig) -> ProvisionerSection:
    p = cfg.provisioner
    prov = build(ProvisionerSection, {"kind": p} if isinstance(p, str) else p, path="provisioner")
    if prov.launcher not in (None, "local"):  # torchforge's multi-host launcher: a Monarch job
        if prov.launcher != "slurm":
            raise ConfigError(f"provisioner.launcher: {prov.launcher!r}: forge launches jobs on slurm (or "
                              f"provisioner.job: process | attach | slurm | kubernetes), not {prov.launcher!r}")
        if prov.job not in (None, "slurm"):
            raise ConfigError(f"provisioner.launcher: slurm and provisioner.job: {prov.job!r} disagree; give one")
        prov.kind, prov.job = "monarch", "slurm"
        if prov.hosts is None and prov.meshes is None:  # torchforge: hosts of its own for each service with `hosts`
            prov.meshes = torchforge_meshes(cfg) or None
            prov.hosts = None if prov.meshes else 1
    if prov.cpu is not None:
        prov.cpus_per_task = prov.cpus_per_task or prov.cpu
    if prov.memMB is not None:
        prov.mem = prov.mem or f"{prov.memMB}M"
    return prov


def torchforge_meshes(cfg: GRPOConfig) -> dict[str, int]:
    """torchforge's SLURM launcher gives each service with `hosts` an allocation of its own
    (hosts x num_replicas nodes), named by its `mesh_name`: those are the job's host groups."""
    meshes: dict[str, int] = {}
    for name, p in [*vars(cfg.services).items(), *vars(cfg.actors).items()]:
        if p.hosts:
            key = p.mesh_name or name
            meshes[key] = meshes.get(key, 0) + p.hosts * p.num_replicas
    return meshes


def _torchforge_mesh_names(cfg: GRPOConfig, report: BuildReport) -> None:
    """torchforge names every service's proc mesh (`mesh_name: policy`); under its SLURM launcher only
    the services with `hosts` have hosts of their own. The others run on any of the job's hosts:
    their mesh_name names no host group, so it is dropped, and said once."""
    prov = cfg.provisioner
    if not isinstance(prov, dict) or prov.get("launcher") != "slurm" or prov.get("meshes") or prov.get("hosts"):
        return
    groups = torchforge_meshes(cfg)
    for block in (cfg.services, cfg.actors):
        for name, p in vars(block).items():
            if p.mesh_name is not None and p.mesh_name not in groups:
                setattr(block, name, dataclasses.replace(p, mesh_name=None))
                report.notes.append(f"{_placement_path(cfg, name)}.mesh_name {p.mesh_name!r} (no `hosts`): placed on "
                                    f"any host of the SLURM job (host groups: {sorted(groups)})")


def provisioner_options(cfg: GRPOConfig) -> tuple[str, dict[str, Any]]:
    """(kind, keyword arguments) for `init_provisioner`: the block with torchforge's names resolved."""
    prov = provisioner_section(cfg)
    if prov.kind == "local":
        return "local", {}
    opts = {f.name: getattr(prov, f.name) for f in dataclasses.fields(prov)}
    for k in ("kind", "launcher", "cpu", "memMB"):
        opts.pop(k)
    if prov.job is None:  # this host: the job keys are all unset (JobConfig.validate refused any)
        opts = {k: opts[k] for k in ("share_gpus", "gpu_count", "poll_s", "boot_timeout_s", "stop_timeout_s")}
    return "monarch", opts


def _validate_placement(cfg: GRPOConfig) -> None:
    """Placements forge cannot run fail here, before any service starts."""
    prov = provisioner_section(cfg)
    if prov.kind not in ("local", "monarch"):
        raise ConfigError(f"'provisioner' must be local or monarch (or {{kind: ..., ...}}), got {prov.kind!r}")
    try:
        prov.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if prov.job is not None and prov.kind != "monarch":
        raise ConfigError(f"provisioner.job: {prov.job!r} places services on Monarch hosts: it needs kind: monarch, "
                          f"got kind: {prov.kind!r}")
    groups = prov.groups() if prov.job is not None else {}
    for name, p in [*vars(cfg.services).items(), *vars(cfg.actors).items()]:
        path = _placement_path(cfg, name)
        try:  # the checks `.options()` makes at start-up, here with the config path
            p.validate(path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        hosts = p.hosts or 1
        if hosts > 1 and prov.job is None:
            raise ConfigError(f"'{path}.hosts: {p.hosts}' needs several hosts: set provisioner.job (process | attach "
                              "| slurm | kubernetes) and its hosts; without a job every replica runs on this host")
        if prov.job is not None:  # a placement the job's hosts cannot hold fails here, naming both
            if p.mesh_name is not None and p.mesh_name not in groups:
                raise ConfigError(f"'{path}.mesh_name: {p.mesh_name}': the job's host groups are {sorted(groups)} "
                                  "(provisioner.meshes)")
            room = groups[p.mesh_name] if p.mesh_name is not None else max(groups.values())
            if hosts > room:
                raise ConfigError(f"'{path}.hosts: {hosts}' (hosts per replica) does not fit: the job has {groups} "
                                  f"host(s) per group ({'group ' + repr(p.mesh_name) if p.mesh_name else 'largest group'}:"
                                  f" {room})")
    _validate_parallelism(cfg)
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


def _validate_parallelism(cfg: GRPOConfig) -> None:
    """The trainer's procs split as tensor_parallel_degree x data_parallel_shard_degree; the
    reference model runs unsharded (only degree 1 means what it says there)."""
    t = cfg.actors.trainer
    world = t.procs * (t.hosts or 1)  # FSDP/TP ranks span the replica's hosts
    try:
        cfg.trainer.parallelism.resolve(world)
    except ValueError as e:
        where = f"actors.trainer.procs: {t.procs}" + (f" x hosts: {t.hosts}" if (t.hosts or 1) > 1 else "")
        raise ConfigError(f"trainer.{e} ({where})") from None
    ref = cfg.ref_model.parallelism
    try:
        ref.validate()
    except ValueError as e:
        raise ConfigError(f"ref_model.{e}") from None
    if ref.tensor_parallel_degree != 1:
        raise ConfigError(f"'ref_model.parallelism.tensor_parallel_degree: {ref.tensor_parallel_degree}': the reference "
                          "model is not tensor-parallel (only the trainer is); use 1")


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


# where the GRPO app places torchtitan's app-level trainer keys (forge.config.compat.APP): the
# run length is `steps`; torchforge writes the batch and sequence length as ${local_batch_size}
# and ${sum:max_req_tokens,max_res_tokens}, which the top-level keys already decide
APP_KEYS: dict[str, str | None] = {"steps": "steps", "local_batch_size": None, "seq_len": None}


def translate_torchtitan_keys(data: dict[str, Any], report: BuildReport, moved: list[str]) -> None:
    """torchtitan's keys in `trainer.*` and `ref_model.model` (torchforge configs carry them) ->
    forge's, through forge.config.compat's table: moved ones are noted, unused ones reported once.
    `trainer.model` is the top-level `model` in torchforge's configs: reported, or refused when
    it names another model (the trainer trains the top-level `model`)."""
    blocks = []
    trainer = data.get("trainer")
    if isinstance(trainer, dict):
        blocks += [("trainer", b, trainer) for b in ("model", "training", "checkpoint", "lr_scheduler")]
    ref = data.get("ref_model")
    if isinstance(ref, dict):
        blocks += [("ref_model", "model", ref), ("ref_model", "training", ref)]
    ref_fields = _fields(RefTrainingSection)
    for owner, block, parent in blocks:
        sub = parent.get(block)
        if not isinstance(sub, dict):
            continue
        for k in [k for k in sub if TORCHTITAN_TRAINER_KEYS.get(f"{block}.{k}", Rename(f"{block}.{k}")).dest
                  != f"{block}.{k}"]:
            rule, value = TORCHTITAN_TRAINER_KEYS[f"{block}.{k}"], sub.pop(k)
            src = f"{owner}.{block}.{k}"
            if rule.dest is None or (owner, block) == ("ref_model", "training") and (
                    rule.dest.startswith(APP) or rule.dest.split(".")[1] not in ref_fields):
                report.unused.append(src)  # a reference model has no steps, batch, grad norm
            elif rule.dest.startswith(APP):
                dest = APP_KEYS[rule.dest[len(APP):]]
                if dest is None:
                    report.unused.append(src)
                elif data.get(dest) is None:
                    data[dest] = rule.value(value)
                    moved.append(f"{src} -> {dest}")
                elif data[dest] != value:
                    raise ConfigError(f"'{src}: {value}' and '{dest}: {data[dest]}' disagree: give one")
            else:
                dblock, dkey = rule.dest.split(".")
                target = parent.setdefault(dblock, {})
                if dkey in target and target[dkey] != rule.value(value):
                    raise ConfigError(f"'{src}: {value}' (torchtitan's name) and '{owner}.{rule.dest}: "
                                      f"{target[dkey]}' (forge's) disagree: give one")
                target[dkey] = rule.value(value)
                moved.append(f"{src} -> {owner}.{rule.dest}")
    model = trainer.pop("model", None) if isinstance(trainer, dict) else None
    if isinstance(model, str):
        model = {"path": model}
    for k, v in (model or {}).items():
        if k not in ("path", "tiny", "seed"):
            titan = sorted(t.split(".", 1)[1] for t in TORCHTITAN_TRAINER_KEYS if t.startswith("model."))
            close = difflib.get_close_matches(k, ["path", *titan], n=1, cutoff=0.6)
            hint = f" — did you mean 'trainer.model.{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key 'trainer.model.{k}'{hint} (valid keys here: path)")
        if k == "path" and same_model(v, data.get("model", GRPOConfig.model)):
            report.unused.append(f"trainer.model.{k}")
            continue
        raise ConfigError(
            f"'trainer.model.{k}: {v}': the trainer trains the top-level model ('model: "
            f"{data.get('model', GRPOConfig.model)}'); set `model` instead (trainer.model.path may repeat it)")


def _hosts_alias(data: dict[str, Any]) -> None:
    """torchforge's ServiceConfig calls `hosts` `hosts_per_replica`: the same key, either name."""
    for block in ("services", "actors"):
        for name, p in (data.get(block) or {}).items():
            if isinstance(p, dict) and "hosts_per_replica" in p:
                alias = p.pop("hosts_per_replica")
                if p.get("hosts") is not None and p["hosts"] != alias:
                    raise ConfigError(f"'{block}.{name}.hosts: {p['hosts']}' and '{block}.{name}.hosts_per_replica: "
                                      f"{alias}' disagree (the same key); give one")
                p["hosts"] = alias


def load_grpo_config(data: dict[str, Any]) -> tuple[GRPOConfig, BuildReport]:
    data, moved = normalize_skill_schema(data)
    _hosts_alias(data)
    for extra in ("grpo_unknown", "training_unknown"):
        if extra in data:
            block = extra.split("_")[0]
            raise ConfigError(f"unknown key(s) {[f'{block}.{k}' for k in sorted(data[extra])]} in the "
                              f"torchforge skill schema's '{block}' block")
    report = BuildReport()
    translate_torchtitan_keys(data, report, moved)
    apply_torchforge_defaults(data, report.notes)
    cfg = build(GRPOConfig, data, report=report)
    resolve_policy_age(cfg, data, report)
    ck = cfg.trainer.checkpoint  # the app checkpoints and resumes itself (with the data position)
    given = [k for k, v in (("dir", ck.dir), ("resume", ck.resume)) if v not in (None, False)]
    if given:
        report.unused.extend(f"trainer.checkpoint.{k}" for k in given)
        report.notes.append(f"trainer.checkpoint.{'/'.join(given)}: the GRPO app checkpoints under output_dir's run "
                            "directory (checkpoints/) and resumes with --resume")
    _torchforge_mesh_names(cfg, report)
    validate_sections(cfg, report)
    _check_held_out(cfg, report)
    if buffer_group_size(cfg) is None:
        report.notes.append(
            f"a step's {episodes_per_step(cfg) * cfg.replay_buffer.dp_size} episodes are not a multiple of "
            f"group_size {cfg.group_size}: episodes, not whole groups, fill each batch (torchforge's meaning); "
            f"rollouts generate {groups_per_step(cfg)} groups per step")
    report.unused.extend(f"(moved) {m}" for m in moved)
    return cfg, report
