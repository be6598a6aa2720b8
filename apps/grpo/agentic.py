"""GRPO on environments (`env:` in the config): groups of multi-turn episodes instead of single answers.

    env:
      _target_: calculator          # a registered environment or an import path (forge.envs)
      difficulty: 3                 # ... its constructor's keyword arguments
      rollout: {max_turns: 3, max_tokens_per_turn: 64, reward: final, reward_actor: false}

The `rollout` sub-block is the app's (it is not passed to the environment). Each group is
`group_size` episodes of ONE task sample, each on a fresh environment instance, run concurrently
through the policy service (the generator batches their turns). Episodes carry every turn in
token space with `loss_mask` 1 on model tokens only; group advantages are per trajectory.

`EnvSampler` replaces the `DatasetActor` (same `sample` / `state_dict` endpoints, so resume keeps
the data position); `evaluate_env` is the held-out success rate (greedy, the task's test split);
`ensure_env_warmup` SFT-trains the tiny model on gold demonstrations first (`model: tiny-sft`).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from forge.controller import ForgeActor, endpoint
from forge.envs import Environment, Trajectory, env_factory, record_trajectory_metrics, run_episode
from forge.errors import InfraError
from forge.observability import Reduce, record_metric
from forge.types import Episode

ENV_WARMUP_VERSION = 1


@dataclass
class RolloutOptions:
    max_turns: int | None = None  # default: the environment's own `max_turns`, else 4
    max_tokens_per_turn: int = 64
    reward: str = "sum"  # "sum" of the env's rewards over the episode, or the "final" one
    reward_actor: bool = False  # also score the final answer with the reward actor (added to the env's)


def split_env_config(env_cfg: dict[str, Any]) -> tuple[dict[str, Any], RolloutOptions]:
    """(the environment spec, the app's rollout options) from the config's `env:` block."""
    spec = {str(k): v for k, v in dict(env_cfg).items()}
    opts = dict(spec.pop("rollout", None) or {})
    unknown = set(opts) - set(RolloutOptions.__dataclass_fields__)
    if unknown:
        raise ValueError(f"env.rollout: unknown key(s) {sorted(unknown)}; valid: "
                         f"{sorted(RolloutOptions.__dataclass_fields__)}")
    ro = RolloutOptions(**opts)
    if ro.reward not in ("sum", "final"):
        raise ValueError(f"env.rollout.reward must be 'sum' or 'final', got {ro.reward!r}")
    return spec, ro


@functools.lru_cache(maxsize=8)
def _factory(spec_json: str) -> tuple[Callable[[], Environment], str, int | None]:
    make = env_factory(json.loads(spec_json))
    probe = make()
    return make, str(getattr(probe, "name", "env")), getattr(probe, "max_turns", None)


def env_setup(cfg: Any) -> tuple[Callable[[], Environment], str, RolloutOptions]:
    """(fresh-environment factory, environment name, rollout options with `max_turns` resolved)."""
    spec, ro = split_env_config(cfg.env)
    make, name, env_turns = _factory(json.dumps(spec, sort_keys=True, default=str))
    if ro.max_turns is None:
        ro.max_turns = int(env_turns or 4)
    return make, name, ro


class EnvSampler(ForgeActor):
    """The env task's training samples in order (`task.sample("train", i)`: already random per i)."""

    restart_policy = "restore"  # a restarted sampler continues at its index, not at the first task

    def __init__(self, env: dict[str, Any], split: str = "train"):
        spec, _ = split_env_config(env)
        self.task = _factory(json.dumps(spec, sort_keys=True, default=str))[0]().task
        if self.task is None or not hasattr(self.task, "sample"):
            raise ValueError(f"environment {spec.get('_target_')!r} has no `task` with sample(split, index): "
                             "the GRPO app needs one to draw training samples")
        self.split, self.index = split, 0

    @endpoint(changes_state=True)
    async def sample(self) -> dict[str, Any]:
        item = self.task.sample(self.split, self.index)
        self.index += 1
        record_metric("dataset/sample/count_samples_generated", 1, Reduce.SUM)
        return item

    @endpoint
    async def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    @endpoint(changes_state=True)
    async def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


async def _episodes(cfg: Any, services: Any, sample: dict[str, Any], n: int, sampling: dict[str, Any]
                    ) -> list[Trajectory | InfraError]:
    """`n` episodes; one whose environment hit an infrastructure failure (a sandbox that cannot start)
    comes back as its `InfraError`: never an episode scored as a wrong answer."""
    make, _, ro = env_setup(cfg)
    tok = services.tokenizer

    async def generate_fn(ids: list[int], sp: dict[str, Any]) -> Any:
        return await services.policy.generate.route(token_ids=ids, sampling=sp)

    async def one() -> Trajectory | InfraError:
        env = make()
        try:
            return await run_episode(generate_fn, env, sample, tok, max_turns=ro.max_turns,
                                     max_total_tokens=cfg.max_req_tokens + cfg.max_res_tokens,
                                     max_tokens_per_turn=ro.max_tokens_per_turn, sampling=sampling,
                                     max_response_tokens=cfg.max_res_tokens)
        except InfraError as e:
            return e
        finally:
            await env.close()

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def rollout_env_group(cfg: Any, services: Any, sample: int | dict[str, Any], group_size: int) -> list[Episode]:
    """`group_size` episodes of one task sample (an index into the train split, or a sample dict),
    as trainer `Episode`s sharing `metadata["group_id"]`; [] when the prompt is over the limit."""
    make, env_name, ro = env_setup(cfg)
    if isinstance(sample, int):
        sample = make().task.sample("train", sample)
    results = await _episodes(cfg, services, sample, group_size, {})
    failed = [r for r in results if isinstance(r, InfraError)]
    if failed:  # the app counts these and drops the group (apps/grpo/support.py InfraErrors); nothing to train on
        gid = f"env-infra-{time.time_ns()}"
        return [Episode(metadata={"group_id": gid, "env": env_name,
                                  **({"infra_error": f"InfraError: {r}"} if isinstance(r, InfraError) else {})})
                for r in results]
    trajs = [r for r in results if isinstance(r, Trajectory)]
    if any(t.stop_reason == "prompt_too_long" or len(t.prompt_ids) > cfg.max_req_tokens for t in trajs):
        record_metric(f"env/{env_name}/skipped_prompt_too_long", 1, Reduce.SUM)
        return []
    extra: list[dict[str, float]] = [{} for _ in trajs]
    if ro.reward_actor:
        finals = [next((m["content"] for m in reversed(t.messages) if m["role"] == "assistant"), "") for t in trajs]
        scores = await services.reward_actor.evaluate.route([sample.get("prompt", "")] * len(trajs), finals,
                                                            [sample.get("target")] * len(trajs))
        extra = [{"reward_actor": float(sc["total"]), **sc["breakdown"],
                  **({"infra_error": sc["infra_error"]} if sc.get("failed") else {})} for sc in scores]
    group_id = f"env-{sample.get('split', 'train')}-{sample.get('index', '?')}-{time.time_ns()}"
    group = []
    for traj, ex in zip(trajs, extra):
        ep = traj.to_episode(services.pad_id, request_len=len(traj.prompt_ids), response_len=len(traj.token_ids),
                             target=sample.get("target"), reward=ro.reward)
        infra_error = ex.pop("infra_error", None) if ex else None
        if ex:
            ep.reward = float(ep.reward) + ex["reward_actor"]
            ep.reward_breakdown = {**ep.reward_breakdown, **ex}
        ep.metadata = {**ep.metadata, "group_id": group_id, "env": env_name}
        if infra_error:  # the reward actor failed on it: the app drops it (apps/grpo/support.py InfraErrors)
            ep.metadata["infra_error"] = infra_error
        record_trajectory_metrics(traj, env_name)
        record_metric("reward/total/mean", float(ep.reward), Reduce.MEAN)
        record_metric(f"reward/env/{env_name}/mean", float(ep.reward), Reduce.MEAN)
        group.append(ep)
    return group


async def evaluate_env(cfg: Any, services: Any, n: int) -> dict[str, float]:
    """Held-out success rate: greedy episodes on the first `n` samples of the task's test split."""
    if n <= 0:
        return {"eval/accuracy": float("nan")}
    make, _, ro = env_setup(cfg)
    task = make().task
    samples = [task.sample(cfg.eval.split, i) for i in range(n)]
    sampling = {"temperature": cfg.eval.temperature}
    results = [t for group in await asyncio.gather(*(_episodes(cfg, services, s, 1, sampling) for s in samples))
               for t in group]
    trajs = [t for t in results if isinstance(t, Trajectory)]  # an infrastructure failure is no verdict
    record_metric("eval/infra_errors", len(results) - len(trajs), Reduce.SUM)
    if not trajs:
        return {"eval/accuracy": float("nan")}
    rewards = [t.reward if ro.reward == "sum" else (t.rewards[-1] if t.rewards else 0.0) for t in trajs]
    n_ok = sum(float(r >= 1.0 - 1e-6) for r in rewards)
    record_metric("eval/num_samples", len(trajs), Reduce.MAX)
    return {
        "eval/accuracy": n_ok / len(trajs),
        "eval/reward_mean": sum(rewards) / len(trajs),
        "eval/avg_turns": sum(t.turns for t in trajs) / len(trajs),
        "eval/tool_call_ok_rate": sum(float(t.tool_calls.ok > 0) for t in trajs) / len(trajs),
        "eval/tool_call_malformed_rate": sum(float(t.tool_calls.malformed > 0) for t in trajs) / len(trajs),
    }


# ---- SFT warm-up on gold demonstrations ---------------------------------------------------------
def _gold_batch(trajs: list[Trajectory], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response tokens; loss mask 1 on the model's tokens only."""
    rows = [(t.all_ids, [0] * len(t.prompt_ids) + t.loss_mask) for t in trajs]
    width = max(len(ids) for ids, _ in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (ids, m) in enumerate(rows):
        tokens[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(m)] = torch.tensor(m)
    return {"tokens": tokens, "loss_mask": mask, "lengths": torch.tensor([len(ids) for ids, _ in rows])}


async def _gold_pool(spec: dict[str, Any], tokenizer: Any, n: int) -> list[Trajectory]:
    from forge.envs.tasks import agold_trajectory

    make = env_factory(spec)
    task = make().task
    return [await agold_trajectory(make(), task.sample("train", i), tokenizer) for i in range(n)]


def _drop_metrics(prefix: str) -> None:
    from forge.observability.metrics import drain

    for r in drain():
        if not r.key.startswith(prefix):
            record_metric(r.key, r.value, r.reduce)


def ensure_env_warmup(env: dict[str, Any], *, steps: int, lr: float, batch_size: int, family: str,
                      hidden_size: int, num_hidden_layers: int, seed: int, cache_dir: str | Path,
                      pool_size: int = 2048) -> Path:
    """An HF model directory: a tiny model SFT-trained on the env's gold multi-turn demonstrations
    (tool call, tool reply, answer) with the loss on the model's tokens only. Cached under
    `cache_dir` by a hash of every argument; written to a temp dir and renamed into place."""
    spec, _ = split_env_config(env)
    args = dict(env=spec, steps=steps, lr=lr, batch_size=batch_size, family=family, hidden_size=hidden_size,
                num_hidden_layers=num_hidden_layers, seed=seed, pool_size=pool_size, v=ENV_WARMUP_VERSION)
    key = hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()[:16]
    final = Path(cache_dir) / f"env-warmup-{spec.get('_target_', 'env')}-{key}"
    from apps.sft.warmup import build_cached
    from forge.models.hf_io import save_model
    from forge.models.tokenizer import load_tokenizer, tiny_tokenizer_path
    from forge.trainer.engine import TrainEngine

    def build(tmp: Path) -> None:
        print(f"SFT warm-up on gold '{spec.get('_target_')}' demonstrations ({steps} steps); cached in {final}")
        t0 = time.perf_counter()
        tok = load_tokenizer(tiny_tokenizer_path())
        pool = asyncio.run(_gold_pool(spec, tok, pool_size))
        if any(t.reward < 1.0 for t in pool):  # the demonstrations must actually solve the task
            raise RuntimeError("gold demonstrations do not all earn reward 1: the env or its gold turns are broken")
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        engine = TrainEngine({
            "model": {"tiny": family, "seed": seed, "hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers,
                      "intermediate_size": 3 * hidden_size, "num_attention_heads": 4, "num_key_value_heads": 2,
                      "vocab_size": len(tok)},
            "loss": "grpo", "optimizer": {"lr": lr, "weight_decay": 0.0},
            "lr_scheduler": {"warmup_steps": min(50, steps // 4)},
            "training": {"dtype": "float32", "max_norm": 1.0, "seed": seed},
        }, device)
        rng = random.Random(seed)
        loss = float("nan")
        for _step in range(steps):
            loss = engine.sft_step(_gold_batch(rng.sample(pool, min(batch_size, len(pool))), tok.pad_token_id))
        _drop_metrics("sft_trainer/")  # the warm-up's step metrics do not belong in the RL run's log
        save_model(engine.model, tmp / "model", tokenizer=tok)
        (tmp / "warmup.json").write_text(json.dumps(
            {"args": args, "final_loss": loss, "seconds": time.perf_counter() - t0}, indent=2, default=str))

    return build_cached(final, build)


__all__ = ["EnvSampler", "RolloutOptions", "ensure_env_warmup", "env_setup", "evaluate_env", "rollout_env_group",
           "split_env_config"]
