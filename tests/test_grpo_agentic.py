"""GRPO on environments (apps/grpo/agentic.py): env rollout groups, eval, the gold-demo warm-up,
and the app end to end on the calculator tool task."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch

from apps.grpo.agentic import EnvSampler, _gold_batch, _gold_pool, ensure_env_warmup, evaluate_env, rollout_env_group, split_env_config
from apps.grpo.config import load_grpo_config
from apps.grpo.main import main
from forge.config import compose, parse_cli, to_container
from forge.data.collate import collate_episodes
from forge.models.tokenizer import load_tokenizer, tiny_tokenizer_path
from forge.observability.metrics import drain, reduce_records
from forge.types import Completion

APPS = Path(__file__).resolve().parents[1] / "apps" / "grpo"
TOK = load_tokenizer(tiny_tokenizer_path())
ENV = {"_target_": "calculator", "difficulty": 3, "max_turns": 3, "rollout": {"max_tokens_per_turn": 64,
                                                                           "reward": "final"}}


class OraclePolicy:
    """Stands in for the policy service: reads the conversation from the token ids and plays the
    gold exchange (tool call, then the tool's result as the answer); every `wrong_every`-th answer
    is off by a digit, so that a group has reward spread."""

    def __init__(self, wrong_every: int = 0):
        self.wrong_every, self.answers = wrong_every, 0
        self.generate = NS(route=self.route)

    async def route(self, *, token_ids, sampling):
        await asyncio.sleep(0)  # let the group's episodes interleave, as with the real service
        text = TOK.decode(token_ids, skip_special_tokens=False)
        results = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", text)
        if results:
            self.answers += 1
            value = results[-1] + ("1" if self.wrong_every and self.answers % self.wrong_every == 0 else "")
            out = f"<answer>{value}</answer>"
        else:
            expr = re.search(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text).group(1)
            out = "<tool_call>" + json.dumps({"name": "calculator", "arguments": {"expression": expr}}) + "</tool_call>"
        ids = (TOK.encode(out, add_special_tokens=False) + [TOK.eos_token_id])[: sampling["max_tokens"]]
        return [Completion(prompt="", text=out, prompt_ids=token_ids, token_ids=ids, logprobs=[-0.5] * len(ids),
                           stop_reason="stop", generator_version=3)]


def fake_run(policy, env=ENV, max_req_tokens=32):
    cfg = NS(env=env, max_req_tokens=max_req_tokens, max_res_tokens=128, eval=NS(split="test", temperature=0.0))
    return cfg, NS(policy=policy, tokenizer=TOK, pad_id=TOK.pad_token_id)


def test_env_group_episodes_masks_rewards_and_metrics():
    cfg, s = fake_run(OraclePolicy(wrong_every=2))
    drain()
    group = asyncio.run(rollout_env_group(cfg, s, 5, group_size=6))
    recorded = reduce_records(drain())
    assert len(group) == 6
    assert len({ep.metadata["group_id"] for ep in group}) == 1 and len({ep.episode_id for ep in group}) == 6
    assert sorted(ep.reward for ep in group) == [0.0] * 3 + [1.0] * 3  # every 2nd answer is wrong
    for ep in group:
        c = ep.completion
        mask = ep.loss_mask.long().tolist()
        assert len(mask) == len(c.token_ids) == ep.response_len and ep.request_len == len(c.prompt_ids)
        model = TOK.decode([t for t, m in zip(c.token_ids.tolist(), mask) if m], skip_special_tokens=False)
        env = TOK.decode([t for t, m in zip(c.token_ids.tolist(), mask) if not m], skip_special_tokens=False)
        assert model.startswith("<tool_call>") and model.count("<|im_end|>") == 2 and "<answer>" in model
        assert "<tool_response>" in env and "<tool_response>" not in model  # env tokens never get gradient
        assert "<tool_call>" not in env and "<answer>" not in env
        lp = c.logprobs.tolist()  # the generator's logprobs on model tokens, 0 on env tokens
        assert all((v == -0.5) if m else (v == 0.0) for v, m in zip(lp, mask))
        assert ep.policy_version == 3 and ep.metadata["turns"] == 2 and ep.metadata["tool_calls"]["ok"] == 1
    for ep, adv in zip(group, [1.0] * 6):
        ep.advantage = adv
    _, targets = collate_episodes(group)
    assert targets[0]["padding_mask"].sum() == sum(int(ep.loss_mask.sum()) for ep in group)
    assert recorded["env/calculator/avg_turns"] == 2.0
    assert recorded["env/calculator/sum_tool_calls_ok"] == 6.0
    assert recorded["env/calculator/sum_tool_calls_malformed"] == 0.0
    assert recorded["env/calculator/avg_reward"] == pytest.approx(0.5)
    assert recorded["reward/total/mean"] == pytest.approx(0.5)


def test_env_group_skips_over_long_prompts_and_rejects_bad_options():
    cfg, s = fake_run(OraclePolicy(), max_req_tokens=8)
    drain()
    assert asyncio.run(rollout_env_group(cfg, s, 0, group_size=2)) == []
    assert reduce_records(drain())["env/calculator/skipped_prompt_too_long"] == 1.0
    with pytest.raises(ValueError, match="max_turn"):
        split_env_config({"_target_": "calculator", "rollout": {"max_turn": 2}})
    with pytest.raises(ValueError, match="reward"):
        split_env_config({"_target_": "calculator", "rollout": {"reward": "mean"}})


def test_env_group_adds_reward_actor_scores():
    cfg, s = fake_run(OraclePolicy())
    cfg.env = {**ENV, "rollout": {**ENV["rollout"], "reward_actor": True}}
    seen = {}

    async def evaluate(prompts, responses, targets):
        seen.update(prompts=prompts, responses=responses, targets=targets)
        return [{"total": 0.25, "breakdown": {"format": 0.25}} for _ in responses]

    s.reward_actor = NS(evaluate=NS(route=evaluate))
    group = asyncio.run(rollout_env_group(cfg, s, 1, group_size=2))
    assert [ep.reward for ep in group] == [1.25, 1.25]
    assert group[0].reward_breakdown == {"env": 1.0, "reward_actor": 0.25, "format": 0.25}
    assert seen["responses"][0].startswith("<answer>") and seen["targets"][0] == group[0].target


def test_evaluate_env_success_rate_on_test_split():
    cfg, s = fake_run(OraclePolicy())
    assert asyncio.run(evaluate_env(cfg, s, 10))["eval/accuracy"] == 1.0
    cfg, s = fake_run(OraclePolicy(wrong_every=1))
    out = asyncio.run(evaluate_env(cfg, s, 10))
    assert out["eval/accuracy"] == 0.0 and out["eval/tool_call_ok_rate"] == 1.0 and out["eval/avg_turns"] == 2.0


def test_env_sampler_keeps_its_position():
    async def go():
        a = await EnvSampler.as_actor(env=ENV)
        first = [await a.sample.call_one() for _ in range(3)]
        state = await a.state_dict.call_one()
        b = await EnvSampler.as_actor(env=ENV)
        await b.load_state_dict.call_one(state)
        return first, state, await b.sample.call_one(), await a.sample.call_one()

    first, state, b_next, a_next = asyncio.run(go())
    assert state == {"index": 3} and b_next == a_next
    assert [x["index"] for x in first] == [0, 1, 2] and all(x["split"] == "train" for x in first)


def test_gold_batch_masks_model_tokens_only():
    pool = asyncio.run(_gold_pool(split_env_config(ENV)[0], TOK, 3))
    b = _gold_batch(pool, TOK.pad_token_id)
    for i, t in enumerate(pool):
        learned = TOK.decode(b["tokens"][i][b["loss_mask"][i].bool()].tolist(), skip_special_tokens=False)
        call, answer = t.messages[1]["content"], t.messages[3]["content"]
        assert learned == f"{call}<|im_end|>{answer}<|im_end|>"
        assert int(b["lengths"][i]) == len(t.all_ids)


def agentic_config(*argv: str):
    cfg, _ = load_grpo_config(to_container(compose(parse_cli(list(argv)), APPS / "tool_task.yaml")))
    return cfg


def test_app_runs_on_the_tool_task_end_to_end(tmp_path):
    cache, run = tmp_path / "cache", tmp_path / "run"
    tiny = ["--warmup.steps", "20", "--warmup.batch_size", "8", "--warmup.hidden_size", "32",
            "--warmup.num_hidden_layers", "1", "--warmup.cache_dir", str(cache)]
    cfg = agentic_config(*tiny, "--output_dir", str(run), "--steps", "3", "--group_size", "4",
                         "--local_batch_size", "8", "--rollout_threads", "1", "--eval.num_samples", "8",
                         "--eval.every", "2", "--samples_every", "1", "--advantage.filter_zero_variance", "false",
                         "--metric_logging", "{jsonl: {}}")
    out = asyncio.run(main(cfg))
    assert out["steps"] == 3 and 0.0 <= out["accuracy_after"] <= 1.0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rows)
    for k in ("env/calculator/avg_turns", "env/calculator/sum_tool_calls_ok", "env/calculator/sum_tool_calls_malformed",
              "env/calculator/sum_tool_calls_errored", "env/calculator/avg_reward", "reward/total/mean",
              "rl_trainer/avg_loss", "eval/accuracy", "eval/avg_turns"):
        assert k in keys, k
    assert not any(k.startswith("sft_trainer/") for k in keys)  # the warm-up's metrics stay out of the log
    assert all(r["env/calculator/avg_turns"] >= 1 for r in rows if "env/calculator/avg_turns" in r)
    sample = json.loads((run / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].startswith("<|im_start|>user\n") and "breakdown" in sample
    # the warm-up is cached: a second resolve reuses it without training
    (warm,) = cache.glob("env-warmup-calculator-*")
    stamp = (warm / "model" / "config.json").stat().st_mtime
    t0 = time.perf_counter()
    again = ensure_env_warmup(cfg.env, steps=20, lr=cfg.warmup.lr, batch_size=8, family="qwen2", hidden_size=32,
                              num_hidden_layers=1, seed=0, cache_dir=cache)
    assert again == warm / "model" and (warm / "model" / "config.json").stat().st_mtime == stamp
    assert time.perf_counter() - t0 < 1.0
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp dir left behind


@pytest.mark.slow
def test_grpo_raises_tool_task_success_rate(tmp_path):
    """The documented tool_task.yaml, shortened: the warm-up is partly correct and GRPO improves it."""
    torch.manual_seed(0)
    cfg = agentic_config("--warmup.cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "run"),
                         "--steps", "50", "--eval.every", "0", "--eval.num_samples", "200",
                         "--metric_logging", "{jsonl: {}}")
    out = asyncio.run(main(cfg))
    before, after = out["accuracy_before"], out["accuracy_after"]
    assert 0.1 < before < 0.7, f"the gold-demo warm-up should be partly correct, got {before}"
    assert after >= before + 0.1, f"GRPO did not raise the tool task's success rate: {before:.3f} -> {after:.3f}"


def test_env_group_infra_failures_are_marked_and_dropped_never_scored():
    """Issue 21: an environment/sandbox that cannot run (InfraError) or a reward actor item that failed
    marks the episode failed; the app's InfraErrors drops the group, counts it, and stops past the limit."""
    from apps.grpo.support import InfraErrors
    from forge.errors import InfraError

    class BrokenSandbox(OraclePolicy):
        async def route(self, *, token_ids, sampling):
            raise InfraError("sandbox: interpreter '/x/bin/python' not found")

    cfg, s = fake_run(BrokenSandbox())
    group = asyncio.run(rollout_env_group(cfg, s, 2, group_size=3))
    assert len(group) == 3 and all("interpreter" in ep.metadata["infra_error"] for ep in group)
    assert all(ep.reward is None for ep in group)  # no score at all, not 0.0

    cfg, s = fake_run(OraclePolicy())
    cfg.env = {**ENV, "rollout": {**ENV["rollout"], "reward_actor": True}}

    async def evaluate(prompts, responses, targets):
        ok = {"total": 0.25, "breakdown": {"format": 0.25}, "failed": False, "infra_error": None}
        return [{"total": float("nan"), "breakdown": {"format": float("nan")}, "failed": True,
                 "infra_error": "reward 'format': RuntimeError: down"}] + [ok] * (len(responses) - 1)

    s.reward_actor = NS(evaluate=NS(route=evaluate))
    flaky = asyncio.run(rollout_env_group(cfg, s, 1, group_size=4))
    assert [bool(ep.metadata.get("infra_error")) for ep in flaky] == [True, False, False, False]

    drain()
    infra = InfraErrors(episodes_per_step=8, max_fraction=0.5)
    assert infra.keep(flaky) is False  # 1 of 4: dropped, counted, under the limit
    m = reduce_records(drain())
    assert m["rollout/infra_error_episodes"] == 1 and m["rollout/infra_error_groups"] == 1
    assert infra.keep(group) is False  # 4 of 7 seen: the step's window (8) is not full, no verdict yet
    with pytest.raises(InfraError, match="7 of 10 .*first cause: reward 'format': RuntimeError: down"):
        infra.keep(group)  # 7 of 10 > 0.5: stops with the first cause
    with pytest.raises(InfraError):
        infra.keep(flaky)  # and stays stopped
