"""Core records that travel between services: `Completion`, `Episode`, `Group`.

Field names follow torchforge so that user code written against it keeps working.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch


@dataclass
class Completion:
    """One sampled answer to one prompt, as the generator returns it.

    `logprobs[i]` is the logprob of `token_ids[i]`, under the one contract that
    `forge.engine.config.SamplingParams` states too (tests/test_logprob_contract.py checks both):
    Returned logprobs are log_softmax(logits / temperature)[token] over the FULL vocabulary:
    temperature-scaled, not truncated or renormalised by top-k/top-p/min-p (what a trainer
    recomputes from its own logits); greedy requests: log_softmax(logits)[token]. With
    `truncated_logprobs=True` they are under the truncated, renormalised distribution actually
    drawn from instead.
    """

    prompt: str
    text: str
    prompt_ids: torch.Tensor
    token_ids: torch.Tensor
    logprobs: torch.Tensor | None = None
    stop_reason: str = "stop"
    generator_version: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prompt_ids = _as_long(self.prompt_ids)
        self.token_ids = _as_long(self.token_ids)
        if self.logprobs is not None and not isinstance(self.logprobs, torch.Tensor):
            self.logprobs = torch.tensor(self.logprobs, dtype=torch.float32)


def _as_long(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.long()
    return torch.tensor(list(x), dtype=torch.long)


@dataclass
class Episode:
    """One trajectory (prompt + completion) with everything the trainer needs.

    `request_tensor` is the prompt left-padded to `request_len`, `response_tensor` the
    completion right-padded to `response_len`; `pad_id` fills both. `loss_mask` (optional,
    same length as the completion) marks which completion tokens get gradient: multi-turn
    episodes put environment/tool tokens in the completion with mask 0.
    """

    episode_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    request: str = ""
    # default: the version of the generator that produced `completion` (0 without one); a
    # constant 0 would make every episode look stale to the replay buffer once training moves on
    policy_version: int = None  # type: ignore[assignment]
    pad_id: int = 0
    request_len: int = 0
    response_len: int = 0
    target: Any = None
    completion: Completion | None = None
    ref_logprobs: torch.Tensor | None = None
    reward: float | None = None
    reward_breakdown: dict[str, float] = field(default_factory=dict)
    advantage: float | None = None
    loss_mask: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policy_version is None:
            self.policy_version = int(self.completion.generator_version) if self.completion is not None else 0

    @property
    def prompt_ids(self) -> torch.Tensor:
        assert self.completion is not None, f"episode {self.episode_id} has no completion"
        return self.completion.prompt_ids

    @property
    def response_ids(self) -> torch.Tensor:
        assert self.completion is not None, f"episode {self.episode_id} has no completion"
        return self.completion.token_ids

    @property
    def request_tensor(self) -> torch.Tensor:
        ids = self.prompt_ids[-self.request_len :] if self.request_len else self.prompt_ids
        length = self.request_len or len(ids)
        out = torch.full((length,), self.pad_id, dtype=torch.long)
        if len(ids):
            out[length - len(ids) :] = ids
        return out

    @property
    def response_tensor(self) -> torch.Tensor:
        ids = self.response_ids
        length = self.response_len or len(ids)
        ids = ids[:length]
        out = torch.full((length,), self.pad_id, dtype=torch.long)
        out[: len(ids)] = ids
        return out

    @property
    def response_mask(self) -> torch.Tensor:
        """1.0 on completion tokens that get gradient, 0.0 on padding and env tokens."""
        n = len(self.response_ids)
        length = self.response_len or n
        mask = torch.zeros(length, dtype=torch.float32)
        mask[: min(n, length)] = 1.0
        if self.loss_mask is not None:
            lm = self.loss_mask.float()[: min(n, length)]
            mask[: len(lm)] *= lm
        return mask


_dataclass_episode_init = Episode.__init__


@functools.wraps(_dataclass_episode_init)
def _episode_init(self: Episode, *args: Any, prompt_ids: Any = None, response_ids: Any = None, **kwargs: Any) -> None:
    # torchforge's docs build episodes from ids, `Episode(prompt_ids=..., response_ids=..., reward=...)`,
    # where forge's ids live on the completion: those keywords become the episode's completion.
    if prompt_ids is not None or response_ids is not None:
        if prompt_ids is None or response_ids is None:
            raise TypeError("Episode(prompt_ids=..., response_ids=...) needs both (or pass completion=)")
        if kwargs.get("completion") is not None:
            raise TypeError("Episode takes completion= or prompt_ids=/response_ids=, not both")
        kwargs["completion"] = Completion(prompt=kwargs.get("request", ""), text="", prompt_ids=prompt_ids,
                                          token_ids=response_ids)
    _dataclass_episode_init(self, *args, **kwargs)


Episode.__init__ = _episode_init  # type: ignore[method-assign]

Group = list[Episode]
"""Episodes that share one prompt (GRPO's unit for advantages)."""

# ---- torchforge's launcher config (`forge.types.LauncherConfig`): refused, with the reason
class Launcher(str, Enum):
    SLURM = "slurm"
    MAST = "mast"


@dataclass
class LauncherConfig:
    """torchforge's multi-host launcher settings. forge takes its hosts from the monarch provisioner's
    job (`init_provisioner("monarch", job="slurm", hosts=N, ...)`, or `provisioner: {launcher: slurm}`
    in an app config): constructing this object is refused with that pointer, not dropped."""

    launcher: Launcher | str = Launcher.SLURM
    job_name: str = ""
    services: dict[str, Any] = field(default_factory=dict)
    actors: dict[str, Any] = field(default_factory=dict)
    cpu: int | None = None
    memMB: int | None = None  # noqa: N815 (torchforge's name)
    gpus_per_node: int | None = None
    account: str | None = None
    qos: str | None = None

    def __post_init__(self) -> None:
        raise NotImplementedError(
            f"LauncherConfig(launcher={str(getattr(self.launcher, 'value', self.launcher))!r}): forge's hosts come "
            "from the monarch provisioner's job: init_provisioner('monarch', job='slurm', hosts=N, partition=..., "
            "account=..., gpus_per_node=...) (or job='process' | 'attach' | 'kubernetes'), or in an app config "
            "`provisioner: {launcher: slurm}` / `forge launch slurm --nodes N`")


@dataclass
class ProvisionerConfig:
    launcher_config: LauncherConfig | None = None


__all__ = ["Completion", "Episode", "Group", "Launcher", "LauncherConfig", "ProvisionerConfig"]
