"""Multi-turn rollouts in token space: `run_episode(generate_fn, env, sample, tokenizer, ...)`.

The conversation is rendered with the chat template ONCE for the prompt. After that, tokens are
only ever appended:
- a model turn: the generator's token ids exactly as sampled (never decoded and re-encoded),
  loss mask 1, the generator's logprobs;
- an environment reply: the chat-template *delta* — the template rendering of the conversation
  with the new messages and the next assistant generation prompt, minus the text so far, e.g.
  `\\n<|im_start|>user\\n<tool_response>\\n...\\n</tool_response><|im_end|>\\n<|im_start|>assistant\\n`
  (plus `<|im_end|>` first when the model's turn was cut before its end-of-turn token) —
  tokenized alone, loss mask 0, logprob 0.

Relation to the rendered final conversation (tested): `full_text` (prompt + every appended piece)
equals `render(messages, add_generation_prompt=False)` minus the template's trailing newline after
the last `<|im_end|>`; and the token ids equal the tokenization of that text whenever the model
emitted canonical tokenizations (a sampled model may spell a string with other tokens than the
tokenizer would: those ids are kept, since they are what the model was trained/sampled on).
All pieces meet at special tokens (`<|im_end|>`, `<|im_start|>`), where BPE never merges, so
tokenizing a delta alone gives the same ids as tokenizing it in context.

Templates that rewrite earlier turns (e.g. Qwen3 dropping old `<think>` blocks) break the
prefix property; the delta is then rendered against a stub conversation instead and the
episode's metadata records `template_mismatch`.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

import torch

from forge.envs.base import Environment, Observation
from forge.envs.tools import ToolCallStats
from forge.types import Completion, Episode

GenerateFn = Callable[[list[int], dict[str, Any]], "Completion | list[Completion] | Awaitable[Any]"]

_STUB_USER, _STUB_ASSISTANT = "forge-stub-user", "forge-stub-assistant"


@dataclass
class Span:
    kind: str  # "model" | "env"
    start: int  # offsets into Trajectory.token_ids (post-prompt)
    end: int
    stop_reason: str = ""


@dataclass
class Trajectory:
    prompt_text: str
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    response_text: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    rewards: list[float] = field(default_factory=list)
    stop_reason: str = ""
    done: bool = False
    turns: int = 0
    spans: list[Span] = field(default_factory=list)
    tool_calls: ToolCallStats = field(default_factory=ToolCallStats)
    generator_versions: list[int] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def reward(self) -> float:
        return float(sum(self.rewards))

    @property
    def full_text(self) -> str:
        return self.prompt_text + self.response_text

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.token_ids

    def _append(self, ids: list[int], kind: str, logprobs: list[float] | None = None, stop_reason: str = "") -> None:
        start = len(self.token_ids)
        self.token_ids += ids
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
        self.loss_mask += [1 if kind == "model" else 0] * len(ids)
        self.spans.append(Span(kind, start, len(self.token_ids), stop_reason))

    def metrics(self) -> dict[str, float]:
        n_model = sum(self.loss_mask)
        return {"turns": self.turns, "reward": self.reward, "tool_calls_ok": self.tool_calls.ok,
                "tool_calls_malformed": self.tool_calls.malformed, "tool_calls_errored": self.tool_calls.errored,
                "sandbox_limit_hits": self.tool_calls.sandbox_limit_hits, "model_tokens": n_model,
                "env_tokens": len(self.token_ids) - n_model, "done": float(self.done)}

    def to_episode(self, pad_id: int, *, request_len: int = 0, response_len: int = 0, target: Any = None,
                   reward: str = "sum", episode_id: str | None = None, policy_version: int | None = None) -> Episode:
        """The trainer's record: prompt = the initial prompt; completion = all turns (model + env
        tokens) with `loss_mask` 1 on model tokens only and logprobs 0 on env tokens.

        `reward`: "sum" of the env's rewards over the episode, or the "final" one.
        `policy_version` defaults to the oldest generator version that produced a model token.
        """
        if reward not in ("sum", "final"):
            raise ValueError(f"to_episode: reward must be 'sum' or 'final', got {reward!r}")
        r = self.reward if reward == "sum" else (self.rewards[-1] if self.rewards else 0.0)
        version = policy_version if policy_version is not None else min(self.generator_versions, default=0)
        meta = {"turns": self.turns, "stop_reason": self.stop_reason, "tool_calls": self.tool_calls.as_dict(),
                "env_rewards": list(self.rewards), "generator_versions": list(self.generator_versions),
                **self.metadata}
        comp = Completion(prompt=self.prompt_text, text=self.response_text, prompt_ids=self.prompt_ids,
                          token_ids=self.token_ids, logprobs=torch.tensor(self.logprobs, dtype=torch.float32),
                          stop_reason=self.stop_reason, generator_version=version, metadata=meta)
        kw = {"episode_id": episode_id} if episode_id else {}
        return Episode(request=self.prompt_text, policy_version=version, pad_id=pad_id, request_len=request_len,
                       response_len=response_len, target=target, completion=comp, reward=float(r),
                       reward_breakdown={"env": float(r)}, loss_mask=torch.tensor(self.loss_mask, dtype=torch.float32),
                       metadata=meta, **kw)


def render(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
           add_generation_prompt: bool, **kwargs: Any) -> str:
    from forge.models.tokenizer import apply_chat_template

    return apply_chat_template(tokenizer, messages, add_generation_prompt=add_generation_prompt,
                               tools=tools or None, tokenize=False, **kwargs)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _end_tokens(tokenizer: Any) -> list[str]:
    ends = {"<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"}
    if getattr(tokenizer, "eos_token", None):
        ends.add(tokenizer.eos_token)
    return sorted(ends, key=len, reverse=True)


def strip_end_of_turn(text: str, tokenizer: Any) -> str:
    """The model's turn without its end-of-turn token (what the env and the message content get)."""
    changed = True
    while changed:
        changed = False
        for e in _end_tokens(tokenizer):
            if text.endswith(e):
                text, changed = text[: -len(e)], True
    return text


def _sampling_dict(sampling: Any) -> dict[str, Any]:
    if sampling is None:
        return {}
    if isinstance(sampling, dict):
        return dict(sampling)
    if is_dataclass(sampling):
        return asdict(sampling)
    if hasattr(sampling, "items"):
        return dict(sampling.items())
    raise TypeError(f"sampling must be a dict or SamplingParams, got {type(sampling).__name__}")


async def _generate(generate_fn: GenerateFn, ids: list[int], sampling: dict[str, Any]) -> Completion:
    out = generate_fn(list(ids), sampling)
    if inspect.isawaitable(out):
        out = await out
    if isinstance(out, (list, tuple)):
        if len(out) != 1:
            raise ValueError(f"generate_fn returned {len(out)} completions; a rollout turn needs exactly 1")
        out = out[0]
    if not hasattr(out, "token_ids"):
        raise TypeError(f"generate_fn must return a Completion (or [Completion]), got {type(out).__name__}")
    return out


def _delta(tokenizer: Any, messages: list[dict[str, Any]], new: list[dict[str, Any]],
           tools: list[dict[str, Any]] | None, text_so_far: str, kw: dict[str, Any]) -> tuple[str, bool]:
    """(text to append for `new` env messages + the next generation prompt, template was prefix-stable)."""
    full = render(tokenizer, messages + new, tools, True, **kw)
    if full.startswith(text_so_far):
        return full[len(text_so_far):], True
    # the template rewrote history: render the new messages after a stub exchange instead
    stub = [{"role": "user", "content": _STUB_USER}, {"role": "assistant", "content": _STUB_ASSISTANT}]
    a = render(tokenizer, stub, None, False, **kw)
    b = render(tokenizer, stub + new, None, True, **kw)
    if not b.startswith(a) or _STUB_ASSISTANT not in a:
        raise ValueError("chat template renders tool/user turns inconsistently; cannot append environment "
                         "replies in token space with this tokenizer")
    close = a[a.rindex(_STUB_ASSISTANT) + len(_STUB_ASSISTANT):]  # e.g. "<|im_end|>\n"
    for e in _end_tokens(tokenizer):
        if text_so_far.endswith(e) and close.startswith(e):
            close = close[len(e):]
            break
    return close + b[len(a):], False


def _env_messages(obs: Observation) -> list[dict[str, Any]]:
    msgs = obs.metadata.get("messages")
    if msgs:
        return [dict(m) for m in msgs]
    return [{"role": obs.metadata.get("role", "user"), "content": obs.text}]


async def run_episode(generate_fn: GenerateFn, env: Environment, sample: Any, tokenizer: Any, *,
                      max_turns: int = 4, max_total_tokens: int = 2048, max_tokens_per_turn: int = 256,
                      sampling: Any = None, tools: list[dict[str, Any]] | None = None,
                      max_response_tokens: int | None = None,
                      chat_template_kwargs: dict[str, Any] | None = None) -> Trajectory:
    """Play one episode of `env` on `sample` with the model behind `generate_fn`.

    `generate_fn(token_ids, sampling_dict) -> Completion` (sync or async; a one-element list is
    fine) continues from the token ids; the rollout sets `sampling["max_tokens"]` per turn.
    Limits: `max_turns` model turns; `max_total_tokens` for prompt + everything after it;
    `max_response_tokens` (optional) for everything after the prompt (the trainer's
    response_len); `max_tokens_per_turn` per model turn. `stop_reason`: "done" (the env ended
    the episode), "max_turns", "max_total_tokens", "max_response_tokens" or "prompt_too_long".
    A model turn cut at `max_tokens_per_turn` is still passed to the env (its span's stop_reason
    is "length") — the env decides what a truncated answer is worth.
    """
    if max_turns < 1 or max_tokens_per_turn < 1 or max_total_tokens < 2:
        raise ValueError(f"run_episode: need max_turns >= 1, max_tokens_per_turn >= 1, max_total_tokens >= 2; got "
                         f"{max_turns}, {max_tokens_per_turn}, {max_total_tokens}")
    kw = dict(chat_template_kwargs or {})
    base_sampling = _sampling_dict(sampling)
    obs = await env.reset(sample)
    messages = [dict(m) for m in (obs.metadata.get("messages") or [{"role": "user", "content": obs.text}])]
    if tools is None:
        tools = obs.metadata.get("tools") or env.tool_schemas()
    prompt_text = render(tokenizer, messages, tools, True, **kw)
    traj = Trajectory(prompt_text=prompt_text, prompt_ids=_encode(tokenizer, prompt_text), messages=messages,
                      tools=tools)
    traj.metadata["template_mismatch"] = 0
    if len(traj.prompt_ids) >= max_total_tokens:
        traj.stop_reason = "prompt_too_long"
        return traj

    def budget() -> tuple[int, str]:
        room = [(max_total_tokens - len(traj.prompt_ids) - len(traj.token_ids), "max_total_tokens")]
        if max_response_tokens is not None:
            room.append((max_response_tokens - len(traj.token_ids), "max_response_tokens"))
        return min(room)

    while True:
        room, limit_name = budget()
        if room < 1:
            traj.stop_reason = limit_name
            break
        want = min(max_tokens_per_turn, room)
        comp = await _generate(generate_fn, traj.all_ids, {**base_sampling, "max_tokens": want})
        ids = [int(t) for t in (comp.token_ids.tolist() if isinstance(comp.token_ids, torch.Tensor)
                                else comp.token_ids)][:want]
        if not ids:
            raise RuntimeError("generate_fn returned no tokens for a rollout turn")
        lps = comp.logprobs
        if lps is None:
            traj.metadata["missing_logprobs"] = True
            lps = [0.0] * len(ids)
        lps = [float(x) for x in (lps.tolist() if isinstance(lps, torch.Tensor) else lps)][: len(ids)]
        if len(lps) != len(ids):
            raise ValueError(f"generate_fn returned {len(ids)} tokens but {len(lps)} logprobs")
        turn_stop = str(comp.stop_reason)
        traj._append(ids, "model", lps, turn_stop)
        traj.turns += 1
        traj.generator_versions.append(int(getattr(comp, "generator_version", 0) or 0))
        model_text = tokenizer.decode(ids, skip_special_tokens=False)
        traj.response_text += model_text
        content = strip_end_of_turn(model_text, tokenizer)
        traj.messages.append({"role": "assistant", "content": content})

        obs = await env.step(content)
        traj.rewards.append(float(obs.reward or 0.0))
        _add_tool_stats(traj.tool_calls, obs.metadata.get("tool_calls"))
        if obs.done:
            traj.done, traj.stop_reason = True, "done"
            traj.metadata["env_stop_reason"] = obs.metadata.get("stop_reason", "")
            break
        if traj.turns >= max_turns:
            traj.stop_reason = "max_turns"
            break
        new = _env_messages(obs)
        delta, stable = _delta(tokenizer, traj.messages, new, tools, traj.full_text, kw)
        traj.metadata["template_mismatch"] += int(not stable)
        delta_ids = _encode(tokenizer, delta)
        room, limit_name = budget()
        if len(delta_ids) + 1 > room:  # the reply would leave no room for the model to answer it
            traj.stop_reason = limit_name
            traj.metadata["unsent_env_reply"] = obs.text
            break
        traj._append(delta_ids, "env")
        traj.response_text += delta
        traj.messages += new
    traj.metadata["last_turn_stop_reason"] = next((s.stop_reason for s in reversed(traj.spans) if s.kind == "model"),
                                                  "")
    return traj


def _add_tool_stats(stats: ToolCallStats, d: dict[str, int] | None) -> None:
    if d:
        stats.add(ToolCallStats(**{k: int(v) for k, v in d.items() if k in ToolCallStats.__dataclass_fields__}))


def scripted_generate_fn(tokenizer: Any, turns: list[str], *, end_of_turn: bool = True,
                         logprob: float = 0.0) -> Callable[[list[int], dict[str, Any]], Completion]:
    """A `generate_fn` replaying fixed model turns (gold demonstrations, tests): turn i is the
    tokenization of `turns[i]` plus the end-of-turn (eos) token, cut at `max_tokens`."""
    eos = tokenizer.eos_token_id
    if end_of_turn and eos is None:
        raise ValueError("scripted_generate_fn: the tokenizer has no eos token to end turns with")
    queue = list(turns)

    def generate(token_ids: list[int], sampling: dict[str, Any]) -> Completion:
        if not queue:
            raise RuntimeError(f"scripted_generate_fn: all {len(turns)} scripted turns were used")
        ids = _encode(tokenizer, queue.pop(0)) + ([eos] if end_of_turn else [])
        cut = int(sampling.get("max_tokens", len(ids)))
        stop = "length" if len(ids) > cut else "stop"
        ids = ids[:cut]
        return Completion(prompt="", text=tokenizer.decode(ids, skip_special_tokens=True), prompt_ids=token_ids,
                          token_ids=ids, logprobs=[logprob] * len(ids), stop_reason=stop)

    return generate


def record_trajectory_metrics(traj: Trajectory, env_name: str = "env") -> None:
    """Per-episode metrics under `env/<name>/...` (turns, tool calls ok/malformed/errored, limit hits, reward)."""
    from forge.observability import Reduce, record_metric

    m = traj.metrics()
    for k in ("turns", "reward", "model_tokens", "env_tokens", "done"):
        record_metric(f"env/{env_name}/avg_{k}", float(m[k]), Reduce.MEAN)
    for k in ("tool_calls_ok", "tool_calls_malformed", "tool_calls_errored", "sandbox_limit_hits"):
        record_metric(f"env/{env_name}/sum_{k}", float(m[k]), Reduce.SUM)
    record_metric(f"env/{env_name}/stop_reason/{traj.stop_reason or 'none'}", 1.0, Reduce.SUM)


__all__ = ["GenerateFn", "Span", "Trajectory", "record_trajectory_metrics", "render", "run_episode",
           "scripted_generate_fn", "strip_end_of_turn"]
