"""Multi-turn rollouts in token space: exact token ids, loss masks, generator logprobs, limits."""

from __future__ import annotations

import asyncio

import pytest
import torch

from forge.envs import CalculatorEnv, Environment, Observation, run_episode, scripted_generate_fn
from forge.envs.rollout import render
from forge.envs.tasks import agold_trajectory
from forge.models import build_tiny_model
from forge.models.tokenizer import load_tokenizer, tiny_tokenizer_path
from forge.types import Completion

TOK = load_tokenizer(tiny_tokenizer_path())
NL = TOK.encode("\n", add_special_tokens=False)


def run(coro):
    return asyncio.run(coro)


class ChatterEnv(Environment):
    """Never ends by itself: replies as `role` every turn, reward 0.25 per turn."""

    def __init__(self, role: str = "user", n_tools: int = 1):
        self.role, self.n_tools, self.t = role, n_tools, 0

    async def reset(self, sample):
        self.t = 0
        return Observation(text=sample["prompt"])

    async def step(self, action):
        self.t += 1
        if self.role == "tool":
            msgs = [{"role": "tool", "content": f"result {self.t}.{i}"} for i in range(self.n_tools)]
            return Observation(text="", reward=0.25, metadata={"messages": msgs, "tool_calls": {"ok": self.n_tools}})
        return Observation(text=f"reply number {self.t}", reward=0.25)


def model_generate_fn(model, temperature=1.0, seed=0):
    """A reference sampler over CausalLM: one full forward per token (slow, obviously correct)."""
    gen = torch.Generator().manual_seed(seed)
    eos = TOK.eos_token_id

    def generate(token_ids, sampling):
        ids = list(token_ids)
        out, lps = [], []
        with torch.no_grad():
            for _ in range(sampling["max_tokens"]):
                logits = model(torch.tensor([ids]))[0, -1].float() / temperature
                logp = torch.log_softmax(logits, -1)
                tok = int(torch.multinomial(logp.exp(), 1, generator=gen))
                out.append(tok)
                lps.append(float(logp[tok]))
                ids.append(tok)
                if tok == eos:
                    break
        stop = "stop" if out[-1] == eos else "length"
        return Completion(prompt="", text="", prompt_ids=token_ids, token_ids=out, logprobs=lps, stop_reason=stop)

    return generate


def full_forward_logprobs(model, all_ids, temperature=1.0):
    with torch.no_grad():
        logits = model(torch.tensor([all_ids]))[0].float() / temperature
    logp = torch.log_softmax(logits[:-1], -1)
    return logp.gather(-1, torch.tensor(all_ids[1:])[:, None])[:, 0]  # logprob of token t+1 given prefix


def check_mask_and_spans(traj):
    assert len(traj.token_ids) == len(traj.loss_mask) == len(traj.logprobs)
    covered = 0
    for sp in traj.spans:
        assert sp.start == covered
        covered = sp.end
        mask = traj.loss_mask[sp.start:sp.end]
        assert mask == [1 if sp.kind == "model" else 0] * (sp.end - sp.start)
        if sp.kind == "env":
            assert traj.logprobs[sp.start:sp.end] == [0.0] * (sp.end - sp.start)
    assert covered == len(traj.token_ids)
    assert traj.spans[-1].kind == "model"  # a trajectory never ends on env tokens nobody answers


def test_gold_calculator_episode_equals_rendered_conversation():
    for schemas in (False, True):
        env = CalculatorEnv(difficulty=4, include_tool_schemas=schemas)
        sample = env.task.sample("train", 3)
        traj = run(agold_trajectory(env, sample, TOK))
        assert traj.stop_reason == "done" and traj.reward == 1.0 and traj.turns == 2
        assert traj.tool_calls.as_dict() == {"ok": 1, "malformed": 0, "errored": 0, "sandbox_limit_hits": 0}
        assert [m["role"] for m in traj.messages] == ["user", "assistant", "tool", "assistant"]
        rendered = render(TOK, traj.messages, traj.tools, add_generation_prompt=False)
        # exact relation: the template adds one "\n" after the final <|im_end|>
        assert rendered == traj.full_text + "\n"
        assert TOK.encode(rendered, add_special_tokens=False) == traj.all_ids + NL
        assert traj.prompt_ids == TOK.encode(render(TOK, traj.messages[:1], traj.tools, True), add_special_tokens=False)
        check_mask_and_spans(traj)
        # model tokens are exactly the two gold turns (+ end of turn); the rest is template/tool text
        model_text = TOK.decode([t for t, m in zip(traj.token_ids, traj.loss_mask) if m], skip_special_tokens=False)
        call, answer = env.task.gold_turns(sample)
        assert model_text == f"{call}<|im_end|>{answer}<|im_end|>"
        env_text = TOK.decode([t for t, m in zip(traj.token_ids, traj.loss_mask) if not m], skip_special_tokens=False)
        assert env_text == (f"\n<|im_start|>user\n<tool_response>\n{sample['target']}\n</tool_response><|im_end|>\n"
                            "<|im_start|>assistant\n")


def test_to_episode_carries_all_turns():
    env = CalculatorEnv(difficulty=3)
    sample = env.task.sample("train", 0)
    traj = run(agold_trajectory(env, sample, TOK))
    ep = traj.to_episode(pad_id=TOK.pad_token_id, request_len=40, response_len=120, target=sample["target"])
    assert ep.reward == 1.0 and ep.target == sample["target"]
    assert ep.completion.prompt_ids.tolist() == traj.prompt_ids
    assert ep.completion.token_ids.tolist() == traj.token_ids
    assert ep.completion.logprobs.shape == ep.completion.token_ids.shape
    assert ep.request_tensor.shape == (40,) and ep.response_tensor.shape == (120,)
    n = len(traj.token_ids)
    mask = ep.response_mask
    assert mask[:n].tolist() == [float(m) for m in traj.loss_mask] and mask[n:].sum() == 0
    assert ep.metadata["turns"] == 2 and ep.metadata["tool_calls"]["ok"] == 1
    assert ep.completion.text == traj.response_text
    with pytest.raises(ValueError):
        traj.to_episode(0, reward="mean")


@pytest.mark.parametrize("role", ["user", "tool"])
def test_random_model_multiturn_logprobs_and_mask(role):
    model = build_tiny_model("qwen2", seed=3, vocab_size=len(TOK))
    env = ChatterEnv(role=role, n_tools=2)
    traj = run(run_episode(model_generate_fn(model, temperature=1.0, seed=1), env, {"prompt": "hello there"}, TOK,
                           max_turns=3, max_total_tokens=400, max_tokens_per_turn=12))
    assert traj.turns == 3 and traj.stop_reason == "max_turns" and traj.reward == pytest.approx(0.75)
    check_mask_and_spans(traj)
    assert sum(sp.kind == "env" for sp in traj.spans) == 2
    if role == "tool":
        assert traj.tool_calls.ok == 6
    # the generator's logprobs of model tokens == a full forward over the whole trajectory
    ref = full_forward_logprobs(model, traj.all_ids)
    p = len(traj.prompt_ids)
    for i, (lp, m) in enumerate(zip(traj.logprobs, traj.loss_mask)):
        if m:
            assert lp == pytest.approx(float(ref[p + i - 1]), abs=1e-4)
    # text: every model turn is closed by the template (eos sampled or added as an env token)
    rendered = render(TOK, traj.messages, None, add_generation_prompt=False)
    last_eos = traj.token_ids[-1] == TOK.eos_token_id
    assert rendered == traj.full_text + ("\n" if last_eos else "<|im_end|>\n")
    assert TOK.decode(traj.all_ids, skip_special_tokens=False) == traj.full_text


def test_real_generator_multiturn_logprobs():
    gen_mod = pytest.importorskip("forge.actors.generator")
    model = build_tiny_model("qwen2", seed=5, vocab_size=len(TOK))
    gen = gen_mod.Generator(model=model, engine=dict(max_num_seqs=4, max_model_len=512, block_size=8),
                            sampling={"temperature": 1.0}, tokenizer=str(tiny_tokenizer_path()))

    async def main():
        async def generate_fn(token_ids, sampling):
            return await gen.generate(token_ids=token_ids, sampling={**sampling, "seed": 7})

        try:
            return await run_episode(generate_fn, ChatterEnv("tool"), {"prompt": "2+2"}, TOK, max_turns=3,
                                     max_total_tokens=300, max_tokens_per_turn=10)
        finally:
            await gen.teardown()

    traj = run(main())
    assert traj.turns == 3 and traj.stop_reason == "max_turns"
    check_mask_and_spans(traj)
    ref = full_forward_logprobs(model, traj.all_ids)
    p = len(traj.prompt_ids)
    got = torch.tensor([lp for lp, m in zip(traj.logprobs, traj.loss_mask) if m])
    want = torch.stack([ref[p + i - 1] for i, m in enumerate(traj.loss_mask) if m])
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


def test_limits_are_recorded():
    env = CalculatorEnv(difficulty=3)
    sample = env.task.sample("train", 1)
    call, answer = env.task.gold_turns(sample)
    gold = run(agold_trajectory(env, sample, TOK))
    p, n_first = len(gold.prompt_ids), gold.spans[0].end

    # total budget ends inside the env reply: nothing of it is appended, the episode stops
    t = run(run_episode(scripted_generate_fn(TOK, [call, answer]), env, sample, TOK, max_turns=4,
                        max_total_tokens=p + n_first + 3, max_tokens_per_turn=200))
    assert t.stop_reason == "max_total_tokens" and t.turns == 1 and len(t.token_ids) == n_first
    assert t.metadata["unsent_env_reply"] == sample["target"]
    t = run(run_episode(scripted_generate_fn(TOK, [call, answer]), env, sample, TOK, max_turns=4,
                        max_total_tokens=4096, max_response_tokens=n_first + 3))
    assert t.stop_reason == "max_response_tokens" and len(t.token_ids) == n_first
    # the per-turn cap cuts the turn; the env sees the truncated call (malformed) and the episode goes on
    t = run(run_episode(scripted_generate_fn(TOK, [call, answer]), env, sample, TOK, max_turns=4,
                        max_total_tokens=4096, max_tokens_per_turn=10))
    assert t.spans[0].stop_reason == "length" and t.spans[0].end == 10 and t.tool_calls.malformed == 1
    # the template closes a cut turn: the env delta starts with the end-of-turn token
    assert t.token_ids[10] == TOK.eos_token_id and t.loss_mask[10] == 0
    assert len(TOK.encode(answer, add_special_tokens=False)) + 1 <= 10  # the answer turn fits the cap
    assert t.stop_reason == "done" and t.reward == 1.0 and t.spans[-1].stop_reason == "stop"
    # max_turns
    t = run(run_episode(scripted_generate_fn(TOK, [call, call]), env, sample, TOK, max_turns=1))
    assert t.stop_reason == "max_turns" and t.turns == 1
    # a prompt over the budget is reported, not a crash
    t = run(run_episode(scripted_generate_fn(TOK, [call]), env, sample, TOK, max_total_tokens=p))
    assert t.stop_reason == "prompt_too_long" and t.token_ids == [] and t.turns == 0
    with pytest.raises(ValueError):
        run(run_episode(scripted_generate_fn(TOK, [call]), env, sample, TOK, max_turns=0))


def test_template_that_rewrites_history_falls_back_to_stub_delta():
    tok = load_tokenizer(tiny_tokenizer_path())
    # like Qwen3: earlier assistant turns lose their <think>...</think> part when re-rendered
    tok.chat_template = tok.chat_template.replace(
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
        "{{- '<|im_start|>' + message.role + '\\n' + message.content.split('</think>')[-1] + '<|im_end|>' + '\\n' }}")
    assert tok.chat_template != TOK.chat_template
    turns = ["<think>hmm</think>first", "second"]
    traj = run(run_episode(scripted_generate_fn(tok, turns), ChatterEnv("user"), {"prompt": "hi"}, tok, max_turns=2))
    assert traj.metadata["template_mismatch"] == 1
    check_mask_and_spans(traj)
    env_text = tok.decode(traj.token_ids[traj.spans[1].start:traj.spans[1].end], skip_special_tokens=False)
    assert env_text == "\n<|im_start|>user\nreply number 1<|im_end|>\n<|im_start|>assistant\n"
    assert traj.full_text.endswith("<think>hmm</think>first<|im_end|>" + env_text + "second<|im_end|>")


def test_bad_generate_fn_outputs_are_clear_errors():
    env = ChatterEnv()

    def two(ids, sp):
        c = Completion(prompt="", text="", prompt_ids=ids, token_ids=[5], logprobs=[0.0])
        return [c, c]

    with pytest.raises(ValueError, match="exactly 1"):
        run(run_episode(two, env, {"prompt": "x"}, TOK))
    with pytest.raises(TypeError, match="Completion"):
        run(run_episode(lambda ids, sp: "text", env, {"prompt": "x"}, TOK))
    bad = lambda ids, sp: Completion(prompt="", text="", prompt_ids=ids, token_ids=[5, 6], logprobs=[0.0])  # noqa: E731
    with pytest.raises(ValueError, match="logprobs"):
        run(run_episode(bad, env, {"prompt": "x"}, TOK))
