"""The GRPO app's plumbing, kept out of main.py so that the loop reads top to bottom."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apps.grpo.config import (
    GRPOConfig,
    buffer_group_size,
    episodes_per_step,
    model_spec,
    provisioner_section,
    ref_training,
)
from forge.actors import ComputeAdvantages, DatasetActor, Generator, ReferenceModel, ReplayBuffer, RewardActor, Trainer
from forge.controller import ActorOptions, NoHealthyReplicaError
from forge.engine.config import EngineConfig, SamplingParams
from forge.errors import InfraError
from forge.losses import build_loss
from forge.observability import Reduce, record_metric
from forge.trainer.config import TrainerConfig, with_switches

log = logging.getLogger("forge.grpo")


def resolve_model(cfg: GRPOConfig) -> str:
    """The model directory: `tiny-sft` runs (or reuses) the SFT warm-up of the embedded default."""
    if cfg.model == "tiny-sft" and cfg.env is not None:  # agentic: SFT on the env's gold demonstrations
        from apps.grpo.agentic import ensure_env_warmup

        w = cfg.warmup
        return str(ensure_env_warmup(cfg.env, steps=w.steps, lr=w.lr, batch_size=w.batch_size, family=w.family,
                                     hidden_size=w.hidden_size, num_hidden_layers=w.num_hidden_layers, seed=cfg.seed,
                                     cache_dir=w.cache_dir))
    if cfg.model == "tiny-sft":
        from apps.sft.warmup import ensure_warmup_checkpoint

        w = cfg.warmup
        ds = cfg.dataset
        path = ensure_warmup_checkpoint(
            task=ds.get("task") or "arithmetic", task_kwargs=ds.get("task_kwargs") or {}, steps=w.steps, lr=w.lr,
            batch_size=w.batch_size, family=w.family, hidden_size=w.hidden_size,
            num_hidden_layers=w.num_hidden_layers, seed=cfg.seed, cache_dir=w.cache_dir,
            eval_samples=cfg.eval.num_samples)
        return str(path)
    from forge.models.hf_io import resolve_model_path

    return str(resolve_model_path(cfg.model))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def weight_sync_config(cfg: GRPOConfig) -> dict[str, Any]:
    """How the trainer's weights reach the generators; one block for both sides.

    Unset `transport`: in-process with the local provisioner; CUDA IPC between processes sharing
    one GPU (`share_gpus`, both on the GPU, this machine's processes); NCCL broadcast when the
    trainer and the generators hold GPUs of their own (monarch, `with_gpus`, no `share_gpus`) or
    run on the hosts of a job (`provisioner.job`; gloo on CPU); else shared memory (/dev/shm)
    between CPU processes. A fresh port and a per-run name keep two jobs on
    one host apart."""
    import os
    import uuid

    from forge.controller.hosts import worker_host
    from forge.controller.placement import free_port
    from forge.weight_sync import TRANSPORTS

    section = provisioner_section(cfg)
    prov, shared, job = section.kind, section.share_gpus, section.job
    sync = dict(cfg.trainer.weight_sync)
    own_gpus = cfg.services.policy.with_gpus and cfg.actors.trainer.with_gpus and not shared
    if "transport" not in sync:
        if prov == "local":
            sync["transport"] = "inproc"
        elif (shared and cfg.services.policy.with_gpus and cfg.actors.trainer.with_gpus and _cuda_available()
              and job in (None, "process")):  # process hosts are this machine's processes
            sync["transport"] = "cuda_ipc"  # processes sharing one GPU: device-to-device, no host copy
        elif (own_gpus or job is not None) and cfg.services.policy.procs == 1:
            # GPUs of their own, or other hosts: NCCL broadcast (gloo on CPU); a tensor-parallel
            # generator's ranks each read their own shard, which broadcast does not serve
            sync["transport"] = "broadcast"
        else:  # CPU processes (or a GPU generator fed by a CPU trainer): through /dev/shm
            sync["transport"] = "shm"
    transport = sync["transport"]
    if transport not in TRANSPORTS:  # fail at start, not at the first weight push
        raise ValueError(f"trainer.weight_sync.transport must be one of {list(TRANSPORTS)}, got {transport!r}")
    one_machine = job in (None, "process") or (
        job == "attach" and all(worker_host(w) in ("127.0.0.1", "localhost") for w in section.workers))
    if transport in ("shm", "cuda_ipc") and not one_machine:
        # /dev/shm files and CUDA IPC handles exist on one machine only: generators on other nodes would fail
        # at the first update (a tensor-parallel generator, whose ranks read their own shards, has no
        # cross-host transport yet)
        raise ValueError(
            f"trainer.weight_sync.transport={transport!r} reaches only this machine's processes, but provisioner.job "
            f"{job!r} places services on other hosts: use 'broadcast' (services.policy.procs must then be 1; a "
            f"tensor-parallel generator across hosts is not supported yet, got procs={cfg.services.policy.procs})")
    if transport == "cuda_ipc":
        if not (_cuda_available() and cfg.services.policy.with_gpus and cfg.actors.trainer.with_gpus):
            raise ValueError("trainer.weight_sync.transport=cuda_ipc needs the trainer and the generator on one "
                             "CUDA GPU (with_gpus: true for both, and a GPU on this host); use 'shm' between "
                             "CPU processes")
    if transport in ("shm", "inproc", "cuda_ipc"):
        sync.setdefault("name", f"policy-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    if transport != "inproc" and cfg.services.policy.with_gpus and _cuda_available():
        # send what the generator holds (bf16 unless set), not the trainer's fp32 master weights
        sync.setdefault("dtype", str(cfg.policy.engine_args.get("dtype") or "bfloat16"))
    if transport == "broadcast":
        if prov == "local":
            raise ValueError("trainer.weight_sync.transport=broadcast needs separate processes "
                             "(provisioner: monarch); the local provisioner uses 'inproc'")
        if cfg.services.policy.procs != 1:
            raise ValueError(f"trainer.weight_sync.transport=broadcast: services.policy.procs must be 1 "
                             f"(one receiver per generator replica), got {cfg.services.policy.procs}")
        if "addr" not in sync:
            if not one_machine:
                raise ValueError(
                    f"trainer.weight_sync.addr: with provisioner.job {job!r} the generators on other hosts reach the "
                    "trainer's rank 0 at this address: set it to the trainer host's name (and trainer.weight_sync.port "
                    "to a port free there)")
            sync["addr"] = "127.0.0.1"
        sync.setdefault("port", free_port())
        sync["num_receivers"] = cfg.services.policy.num_replicas
    return sync


def _opts(p: ActorOptions) -> dict[str, Any]:
    return dataclasses.asdict(p)


@dataclass
class Services:
    dataloader: Any
    policy: Any
    trainer: Any
    replay_buffer: Any
    compute_advantages: Any
    reward_actor: Any
    ref_model: Any | None
    pad_id: int
    correct_key: str | None
    eval_prompts: list[dict[str, Any]]
    tokenizer: Any = None  # agentic rollouts render chat turns with it
    weight_transport: str = "inproc"


async def sync_weights(s: Services, version: int) -> None:
    """Trainer -> generators as `version`. An NCCL/gloo broadcast is a collective: the trainer's
    push and the generators' receive run at once; the other transports publish, then apply.

    A generator replica that dies (or hangs) during the update is skipped, not a crash: the
    service replaces it, and the replacement restores the newest published weights before it
    takes requests (the Generator's restart policy 'restore')."""
    if s.weight_transport == "broadcast":
        await asyncio.gather(s.trainer.push_weights.call(version), s.policy.update_weights.fanout(version))
        return
    await s.trainer.push_weights.call(version)
    try:
        await s.policy.update_weights.fanout(version)
    except NoHealthyReplicaError:
        if not s.policy.restarting:
            raise
        log.warning("weight sync %d: every generator replica died during the update; their replacements "
                    "load version %d as they start", version, version)


async def build_services(cfg: GRPOConfig, model_path: str, run_dir: Path,
                         sync: dict[str, Any] | None = None) -> Services:
    from forge.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loss_spec = cfg.trainer.loss if cfg.trainer.loss is not None else cfg.loss
    needs_ref = bool(getattr(build_loss(loss_spec), "needs_ref", False))
    sampling = {"max_tokens": cfg.max_res_tokens, **cfg.policy.sampling_params}
    sampling.pop("n", None)  # the group size is passed per call
    temperature = float(sampling.get("temperature", 1.0))
    own_engine = {f.name for f in dataclasses.fields(EngineConfig)}
    engine = {k: v for k, v in cfg.policy.engine_args.items() if k in own_engine}
    engine.setdefault("max_model_len", cfg.max_req_tokens + cfg.max_res_tokens)
    engine.setdefault("long_prompt", "truncate")  # an over-long prompt never crashes the rollout
    sync = sync or weight_sync_config(cfg)

    t = cfg.trainer
    # typed once here and validated before any actor starts; the Trainer receives this object as it is
    # (the app resumes and saves explicitly: it also restores/saves the data position)
    trainer_cfg = TrainerConfig(
        # with LoRA the reference model (when the loss needs one) loads `model_path` as before: the base weights
        model={"path": model_path}, loss=loss_spec, optimizer=t.optimizer, lr_scheduler=t.lr_scheduler,
        training=dataclasses.replace(with_switches(t.training, t.compile, t.activation_checkpoint),
                                     temperature=temperature, pad_id=pad_id),
        checkpoint=dataclasses.replace(t.checkpoint, dir=str(run_dir / "checkpoints"), resume=False, interval=0),
        lora=cfg.lora, parallelism=t.parallelism)
    trainer_cfg.validate()
    rb = cfg.replay_buffer
    batch_size = episodes_per_step(cfg)
    rewards = cfg.rewards

    coros = [
        DatasetActor.options(**_opts(cfg.actors.dataset)).as_actor(model=model_path, **cfg.dataset)
        if cfg.env is None else _env_sampler(cfg),  # agentic: samples come from the env's task
        Generator.options(**_opts(cfg.services.policy)).as_service(
            model=model_path, engine=EngineConfig.from_dict(engine), sampling=SamplingParams.from_dict(sampling),
            weight_sync=sync),
        Trainer.options(**_opts(cfg.actors.trainer)).as_actor(config=trainer_cfg, weight_sync=sync),
        ReplayBuffer.options(**_opts(cfg.actors.replay_buffer)).as_actor(
            batch_size=batch_size, dp_size=rb.dp_size,
            max_policy_age=cfg.off_by_n,  # resolved with replay_buffer.max_policy_age at load
            max_buffer_size=rb.max_buffer_size, max_resample_count=rb.max_resample_count,
            group_size=buffer_group_size(cfg), seed=rb.seed if rb.seed is not None else cfg.seed),
        ComputeAdvantages.options(**_opts(cfg.actors.compute_advantages)).as_actor(
            method=cfg.advantage.method, **cfg.advantage.options),
        RewardActor.options(**_opts(cfg.services.reward_actor)).as_service(
            rewards=rewards, timeout_s=cfg.reward.timeout_s, isolation=cfg.reward.isolation,
            process_workers=cfg.reward.workers),
    ]
    if needs_ref:  # skipped entirely when the loss has no KL term
        coros.append(ReferenceModel.options(**_opts(cfg.services.ref_model)).as_service(
            model=model_spec(cfg.ref_model.model) or {"path": model_path},
            training={**ref_training(cfg), "temperature": temperature, "pad_id": pad_id}))
    handles = await asyncio.gather(*coros)
    dataloader, policy, trainer, buffer, adv, reward_actor = handles[:6]
    names = await reward_actor.reward_names.route()
    correct_key = cfg.eval.correct_reward or (names[0] if names else None)
    if cfg.env is not None:  # agentic: the env's reward is the success signal; its test split is the eval
        correct_key = "env"
    cfg_eval = dict(cfg.dataset, split=cfg.eval.split, shuffle=False, max_epochs=1)
    if "task" in cfg_eval and cfg_eval.get("task"):
        cfg_eval["num_samples"] = cfg.eval.num_samples
    eval_prompts = _eval_prompts(cfg_eval, model_path, cfg.eval.num_samples if cfg.env is None else 0)
    s = Services(dataloader, policy, trainer, buffer, adv, reward_actor, handles[6] if needs_ref else None,
                 pad_id, correct_key, eval_prompts, tokenizer, weight_transport=sync["transport"])
    return s


def _env_sampler(cfg: GRPOConfig) -> Any:
    from apps.grpo.agentic import EnvSampler

    return EnvSampler.options(**_opts(cfg.actors.dataset)).as_actor(env=cfg.env)


def _eval_prompts(ds_cfg: dict[str, Any], model_path: str, n: int) -> list[dict[str, Any]]:
    from forge.data.datasets import PromptDataset

    if n <= 0:
        return []
    try:
        ds = PromptDataset(ds_cfg, tokenizer=model_path)
    except Exception as e:  # e.g. a file dataset without a test split
        log.warning("no held-out evaluation: cannot load split '%s' (%s)", ds_cfg.get("split"), e)
        return []
    out = []
    for item in ds:
        out.append(item)
        if len(out) >= n:
            break
    return out


async def evaluate(cfg: GRPOConfig, s: Services, step: int) -> dict[str, float]:
    """Greedy held-out accuracy: the fraction of prompts whose `correct_key` reward is 1."""
    if cfg.env is not None:  # agentic: success rate of greedy episodes on the env task's test split
        from apps.grpo.agentic import evaluate_env

        return await evaluate_env(cfg, s, cfg.eval.num_samples)
    if not s.eval_prompts or s.correct_key is None:
        return {"eval/accuracy": float("nan")}
    sampling = {"temperature": cfg.eval.temperature, "max_tokens": cfg.max_res_tokens}

    async def one(item: dict[str, Any]) -> tuple[str, str, Any]:
        c = (await s.policy.generate.route(item["request"], n=1, sampling=sampling))[0]
        return item["request"], c.text, item["target"]

    results = await asyncio.gather(*(one(it) for it in s.eval_prompts))
    prompts, responses, targets = map(list, zip(*results))
    scored = await s.reward_actor.evaluate.route(prompts, responses, targets, record=False)
    scores = [sc for sc in scored if not sc.get("failed")]  # a failed reward is no verdict: left out, counted
    record_metric("eval/infra_errors", len(scored) - len(scores), Reduce.SUM)
    if not scores:
        return {"eval/accuracy": float("nan")}
    correct = [float(sc["breakdown"].get(s.correct_key, 0.0) >= 1.0 - 1e-6) for sc in scores]
    acc = sum(correct) / len(correct)
    record_metric("eval/num_samples", len(correct), Reduce.MAX)
    return {"eval/accuracy": acc, "eval/reward_mean": sum(sc["total"] for sc in scores) / len(scores)}


class InfraErrors:
    """Episodes whose reward failed (`metadata["infra_error"]`: a reward raised or timed out, a
    sandbox could not start): never trained on. A group holding one is dropped whole (the replay
    buffer trains complete groups only) and another is drawn; `rollout/infra_error_episodes` and
    `rollout/infra_error_groups` count them. Over each step's worth of scored episodes, a failed
    fraction above `max_fraction` stops the run with the first cause seen (`error`, raised)."""

    def __init__(self, episodes_per_step: int, max_fraction: float):
        self.window, self.max_fraction = episodes_per_step, max_fraction
        self.seen = self.failed = 0
        self.cause: str | None = None
        self.error: InfraError | None = None

    def keep(self, group: list[Any]) -> bool:
        """True when the group may be trained on; raises `InfraError` once the failures are too many."""
        if self.error is not None:
            raise self.error
        causes = [ep.metadata["infra_error"] for ep in group if ep.metadata.get("infra_error")]
        self.seen += len(group)
        self.failed += len(causes)
        if causes:
            self.cause = self.cause or causes[0]
            record_metric("rollout/infra_error_episodes", len(causes), Reduce.SUM)
            record_metric("rollout/infra_error_groups", 1, Reduce.SUM)
        if self.seen >= self.window:
            frac = self.failed / self.seen
            if frac > self.max_fraction:
                self.error = InfraError(
                    f"{self.failed} of {self.seen} episodes ({frac:.0%}) hit infrastructure failures (reward/sandbox), "
                    f"over reward.max_infra_error_fraction={self.max_fraction}; first cause: {self.cause}")
                raise self.error
            self.seen = self.failed = 0
        return not causes


class RolloutBudget:
    """How many groups rollouts may start before the trainer finishes another step.

    On-policy (`ahead=0`): exactly one step's worth of groups per version, generated after the
    new weights are in the generator. Async (`ahead=k`): up to k more steps' worth may be
    generated while the trainer works; the replay buffer evicts what grows too old.
    """

    def __init__(self, groups_per_step: int, ahead: int):
        self.available = groups_per_step * (ahead + 1)
        self.groups_per_step = groups_per_step
        self.cond = asyncio.Condition()

    async def acquire(self, stop: asyncio.Event) -> bool:
        async with self.cond:
            await self.cond.wait_for(lambda: self.available > 0 or stop.is_set())
            if stop.is_set():
                return False
            self.available -= 1
            return True

    def refund(self) -> None:
        self.available += 1
        self._notify()

    def release_step(self) -> None:
        self.available += self.groups_per_step
        self._notify()

    def wake(self) -> None:
        self._notify()

    def _notify(self) -> None:
        async def go() -> None:
            async with self.cond:
                self.cond.notify_all()

        asyncio.ensure_future(go())


def write_learning_curve(history: list[dict[str, float]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib missing: no learning curve PNG")
        return None
    series = {
        "train reward (mean)": [(h["step"], h[k]) for h in history for k in ("reward/total/mean",) if k in h],
        "train accuracy": [(h["step"], h["rollout/accuracy"]) for h in history if "rollout/accuracy" in h],
        "held-out accuracy": [(h["step"], h["eval/accuracy"]) for h in history if "eval/accuracy" in h],
    }
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, pts in series.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if label.startswith("held") else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("reward / accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
