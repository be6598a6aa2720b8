"""The bad-input catalogue (issue 26): each bad input gives ONE clear error naming the thing wrong,
and nothing a run already saved (checkpoints, metrics.jsonl, samples.jsonl) is lost or corrupted.

Each case is one function `case(ctx) -> (error, pattern)` or raises AssertionError itself; the
driver checks the error's type and that its message names what is wrong, then (for every case,
the run directory is passed to all of them) that the saved run directory is byte-identical and
its checkpoint still loads. Loaders and actors are called directly (no whole GRPO runs) except
`--resume`, whose path through `apps.grpo.main` is the point of that case.

Reward cases: a reward that raises / hangs / returns NaN or a non-number must be NAMED in what
the caller sees (the error, or the item's `errors` on main today). Whether its total may be a
plain 0.0 (indistinguishable from a wrong answer) is settled (rewards that
fail are `forge.errors.InfraError`-marked failures); `test_failed_reward_is_not_a_silent_zero`
asserts that.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from test_grpo_failures import config, run  # tiny_model: the conftest fixture

from forge.config import ConfigError
from forge.controller import init_provisioner, shutdown
from forge.data.datasets import DatasetError, PromptDataset
from forge.data.rewards import build_rewards
from forge.engine import LLMEngine
from forge.envs import CalculatorEnv, run_episode, scripted_generate_fn
from forge.models import build_tiny_model, load_model, save_model
from forge.models.hf_io import CheckpointError as ModelCheckpointError
from forge.models.tiny import write_tiny_checkpoint
from forge.models.tokenizer import load_tokenizer, tiny_tokenizer_path
from forge.trainer import CheckpointError, latest_checkpoint
from forge.trainer.engine import TrainEngine
from forge.trainer.testing import random_rl_batch

RNG = random.Random()  # fresh inputs each run; the failing seed is in the assertion message
SEED = RNG.randrange(10**6)
RNG.seed(SEED)


# ---- the saved run directory every case must leave intact -------------------------------------
def _engine(ck: Path, family: str = "qwen2", **model: Any) -> TrainEngine:
    return TrainEngine({"model": {"tiny": family, "seed": 0, **model}, "loss": {"name": "grpo", "beta": 0.0},
                        "optimizer": {"lr": 1e-3}, "training": {"max_tokens_per_microbatch": 20},
                        "checkpoint": {"dir": str(ck)}})


@dataclass
class Ctx:
    tmp: Path
    run_dir: Path  # a GRPO output_dir with a checkpoint, metrics.jsonl, samples.jsonl
    model: str  # a tiny qwen2 HF dir (the model the run was trained with)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny_model) -> Path:  # noqa: F811
    run_dir = tmp_path_factory.mktemp("run")
    e = _engine(run_dir / "checkpoints")
    e.train_step(*random_rl_batch(batch=4, seed=SEED))
    e.save(step=1, extra={"step": 1, "dataset": {"epoch": 0, "index": 16, "seed": 0, "rank": 0, "world_size": 1}})
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, 4):
            f.write(json.dumps({"step": step, "reward/total/mean": RNG.random(), "loss": RNG.gauss(0, 1)}) + "\n")
    with open(run_dir / "samples.jsonl", "w") as f:
        f.write(json.dumps({"step": 1, "prompt": f"{RNG.randint(1, 99)}+1", "response": "x", "reward": 0.0}) + "\n")
    return run_dir


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


# ---- the cases ---------------------------------------------------------------------------------
Case = Callable[[Ctx], tuple[type[BaseException], str, Callable[[], Any]]]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


@case
def steps_not_an_integer(ctx: Ctx):
    bad = RNG.choice(["abc", "ten", "1e3x"])
    return ConfigError, rf"'steps' must be an integer, got str '{bad}'", \
        lambda: config(ctx.model, ctx.run_dir, "--steps", bad)


@case
def missing_model_path(ctx: Ctx):
    # through the app (on the run's own output_dir): it must fail before writing anything there
    missing = ctx.tmp / f"no_such_model_{RNG.randrange(1000)}"
    return FileNotFoundError, rf"model directory '{re.escape(str(missing))}' does not exist", \
        lambda: run(config(str(missing), ctx.run_dir))


@case
def truncated_safetensors_shard(ctx: Ctx):
    d = ctx.tmp / "sharded"
    save_model(build_tiny_model("qwen2"), d, max_shard_size="50KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1, "the tiny model should be saved in several shards"
    shard = RNG.choice(shards)
    data = shard.read_bytes()
    shard.write_bytes(data[: RNG.randint(len(data) // 4, len(data) - 16)])
    return ModelCheckpointError, rf"{re.escape(shard.name)}.*(truncated|corrupt)", lambda: load_model(d)


@case
def config_json_missing_a_field(ctx: Ctx):
    d = ctx.tmp / "nofield"
    write_tiny_checkpoint(d, RNG.choice(["llama", "qwen2", "qwen3"]))
    cfg = json.loads((d / "config.json").read_text())
    key = RNG.choice(["hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads"])
    del cfg[key]
    (d / "config.json").write_text(json.dumps(cfg))
    return ValueError, rf"config\.json: missing required field\(s\) \['{key}'\]", lambda: load_model(d)


@case
def dataset_row_without_its_answer(ctx: Ctx):
    rows = [{"question": f"{a}+{a}", "answer": str(2 * a)} for a in RNG.sample(range(1000), 6)]
    bad = RNG.randrange(len(rows))
    del rows[bad]["answer"]
    path = ctx.tmp / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))

    def read_all():
        return list(PromptDataset({"path": str(path), "shuffle": False, "max_epochs": 1}, require_target=True))
    return DatasetError, rf"no value in its target column 'answer' \(prompt: '{re.escape(rows[bad]['question'])}'\)", \
        read_all


@case
def empty_dataset(ctx: Ctx):
    path = ctx.tmp / "empty.jsonl"
    path.write_text("")
    return DatasetError, r"empty\.jsonl.*is empty: no rows to train on", \
        lambda: PromptDataset({"path": str(path)}, require_target=True)


@case
def unknown_reward_import_path(ctx: Ctx):
    mod = f"no_such_pkg_{RNG.randrange(1000)}.rewards"
    return ImportError, rf"cannot import reward '{mod}:brevity': No module named 'no_such_pkg_", \
        lambda: build_rewards([{"_target_": f"{mod}:brevity", "weight": 1.0}])


@case
def prompt_longer_than_the_context(ctx: Ctx):
    # the engine's contract (forge.engine.engine): reported with its length, never a crash or a
    # sequence run past max_model_len; GRPO's default (long_prompt=truncate) keeps the newest tokens
    limit = RNG.randint(32, 64)
    n = RNG.randint(limit, 2 * limit)
    ids = [RNG.randrange(1, 500) for _ in range(n)]
    model = build_tiny_model("qwen2")
    out = LLMEngine(model, {"max_model_len": limit, "long_prompt": "reject"}).generate([(ids, {"max_tokens": 4})])[0]
    assert out.outputs[0].stop_reason == "prompt_too_long" and out.metadata["prompt_too_long"] == n
    assert out.outputs[0].token_ids == []
    out = LLMEngine(model, {"max_model_len": limit, "long_prompt": "truncate"}).generate([(ids, {"max_tokens": 4})])[0]
    assert out.metadata["prompt_truncated"] and out.metadata["truncated_prompt_tokens"] == n - (limit - 4)
    assert list(out.prompt_ids) == ids[n - (limit - 4):]
    assert len(out.prompt_ids) + len(out.outputs[0].token_ids) <= limit
    return None


@case
def malformed_tool_call_json(ctx: Ctx):
    # the model gets the error as its tool response (it names the JSON fault), the episode goes on
    tok = load_tokenizer(tiny_tokenizer_path())
    env = CalculatorEnv(difficulty=3)
    sample = env.task.sample("train", RNG.randrange(100))
    call, answer = env.task.gold_turns(sample)
    bad = RNG.choice(['<tool_call>{"name": "calculator", "arguments": {"expression": 2+}}</tool_call>',
                      '<tool_call>{"name": "calculator", "arguments": </tool_call>',
                      "<tool_call>{'name': 'calculator'}</tool_call>"])
    t = asyncio.run(run_episode(scripted_generate_fn(tok, [bad, call, answer]), env, sample, tok, max_turns=4))
    assert t.tool_calls.malformed == 1 and t.tool_calls.ok == 1, t.tool_calls.as_dict()
    reply = t.messages[2]
    assert reply["role"] == "tool" and re.search(r"invalid JSON in tool call: .* at char \d+", reply["content"]), reply
    assert t.stop_reason == "done" and t.reward == 1.0
    return None


@case
def resume_from_another_model_shape(ctx: Ctx):
    other = ctx.tmp / "other_shape"
    write_tiny_checkpoint(other, "llama")
    # the trainer actor's error (ActorError) carries the original's type and message
    return Exception, r"CheckpointMismatchError.*holds another model shape than the one configured: .*" \
        r"not in the model: \[.*self_attn\.(q|k|v)_proj\.bias", \
        lambda: run_resume(config(str(other), ctx.run_dir))


def run_resume(cfg):
    from apps.grpo.main import main

    return asyncio.run(asyncio.wait_for(main(cfg, resume=True), 120))


@case
def resume_with_every_checkpoint_corrupt(ctx: Ctx):
    # was None: `--resume` warned "no checkpoint" and trained from scratch
    import shutil

    ck = ctx.tmp / "ck_corrupt"
    shutil.copytree(ctx.run_dir / "checkpoints", ck)
    victim = max((f for f in (ck / "step_1").iterdir() if f.suffix == ".distcp"), key=lambda f: f.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: RNG.randint(1, victim.stat().st_size - 1)])
    return CheckpointError, rf"none of the 1 checkpoints in '.*ck_corrupt' can be loaded: step 1: .*{victim.name}", \
        lambda: _engine(ck).load()


@case
def disk_full_during_checkpoint_write(ctx: Ctx):
    # a writer failing midway (after DCP wrote part of the shards) with ENOSPC; on a copy of the run
    import shutil

    ck = ctx.tmp / "ck_copy"
    shutil.copytree(ctx.run_dir / "checkpoints", ck)
    e = _engine(ck)
    e.load()
    e.train_step(*random_rl_batch(batch=4, seed=SEED + 1))
    real = torch.save
    calls = {"n": 0}
    fail_at = RNG.randint(1, 2)

    def failing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] >= fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(getattr(f, "name", f)))
        return real(obj, f, *a, **k)

    before = _snapshot(ck / "step_1")

    def save():
        torch.save = failing_save
        try:
            e.save(step=2)
        finally:
            torch.save = real
            # the previous checkpoint survives, byte for byte, and is still the one resumed from
            assert _snapshot(ck / "step_1") == before, "a failed save changed the checkpoint already saved"
            assert latest_checkpoint(ck).name == "step_1" and _engine(ck).load()["step"] == 1
            assert not list(ck.glob("step_2*")), "the partial write should be removed (it holds disk)"
    return CheckpointError, r"saving checkpoint step 2 to '.*step_2\.tmp' failed: .*No space left on device", save


# ---- reward cases: the reward's name must reach the caller ---------------------------------------
def hang(prompt: str, response: str, target: Any) -> float:
    threading.Event().wait(3.0)  # longer than the actor's timeout; ends on its own afterwards
    return 1.0


def nan_reward(prompt: str, response: str, target: Any) -> float:
    return float("nan")


def words_reward(prompt: str, response: str, target: Any) -> Any:
    return "very good"


class FlakyJudge:
    name = "flaky_judge"

    def __call__(self, prompt: str, response: str, target: Any) -> float:
        raise ConnectionError(f"judge endpoint refused the connection for {prompt!r}")


REWARD_CASES = {  # name -> (reward, what the message must say about it)
    "raises": (FlakyJudge(), r"ConnectionError: judge endpoint refused"),
    "hangs": (hang, r"timeout|no result in"),
    "nan": (nan_reward, r"nan"),
    "not_a_number": (words_reward, r"could not convert string to float: 'very good'|not a number|very good"),
}


async def _evaluate(reward: Any, **kw: Any) -> Any:
    from forge.actors.reward import RewardActor

    init_provisioner("local")
    try:
        actor = await RewardActor.as_actor(reward_functions=[reward], timeout_s=0.5)
        return await actor.evaluate_response.call_one(prompt="2+2", response="<answer>4</answer>", target="4", **kw)
    finally:
        await shutdown()


@pytest.mark.parametrize("kind", sorted(REWARD_CASES))
def test_failing_reward_is_named(kind):
    """Either way (today: the item's `errors`; after the concurrent change: an InfraError-marked
    failure), what the caller gets names the reward and what went wrong."""
    reward, what = REWARD_CASES[kind]
    from forge.data.rewards import reward_name

    name = reward_name(reward)
    try:
        item = asyncio.run(_evaluate(reward, return_breakdown=True))
    except Exception as e:  # noqa: BLE001 — the new behaviour: the failure reaches the caller
        assert name in str(e) and re.search(what, str(e), re.I), f"{type(e).__name__}: {e}"
        return
    assert name in item["errors"], item
    assert re.search(what, item["errors"][name], re.I), item["errors"]


def test_failed_reward_is_not_a_silent_zero():
    try:
        total = asyncio.run(_evaluate(FlakyJudge()))
    except Exception as e:  # noqa: BLE001
        assert "flaky_judge" in str(e)
        return
    assert not (isinstance(total, float) and total == 0.0), "a failed reward read as a wrong answer (0.0)"


# ---- the driver --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, saved_run, tiny_model):  # noqa: F811
    ctx = Ctx(tmp_path, saved_run, tiny_model)
    before = _snapshot(saved_run)
    got = CASES[name](ctx)
    if got is not None:
        error, pattern, act = got
        with pytest.raises(error) as ei:
            act()
        assert re.search(pattern, str(ei.value), re.S), f"seed {SEED}: {type(ei.value).__name__}: {ei.value}"
    after = _snapshot(saved_run)
    assert after == before, f"seed {SEED}: {name} changed the saved run: " \
        f"{sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))}"
    assert _engine(tmp_path / "probe_ck").load(latest_checkpoint(saved_run / "checkpoints"))["step"] == 1
