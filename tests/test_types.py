"""forge.types: Completion / Episode field names, padding helpers and masks."""

from __future__ import annotations

import dataclasses

import torch

from forge.types import Completion, Episode, Group


def completion(prompt_ids: list[int], token_ids: list[int], **kw: object) -> Completion:
    return Completion(prompt="p", text="t", prompt_ids=prompt_ids, token_ids=token_ids, **kw)  # type: ignore[arg-type]


def test_field_names_match_torchforge() -> None:
    c = {f.name for f in dataclasses.fields(Completion)}
    assert {"prompt", "text", "prompt_ids", "token_ids", "logprobs", "stop_reason", "generator_version",
            "metadata"} <= c
    e = {f.name for f in dataclasses.fields(Episode)}
    assert {"episode_id", "request", "policy_version", "pad_id", "request_len", "response_len", "target",
            "completion", "ref_logprobs", "reward", "advantage"} <= e
    assert Group == list[Episode]


def test_completion_converts_lists() -> None:
    c = completion([1, 2], [3, 4, 5], logprobs=[-0.1, -0.2, -0.3])
    assert c.prompt_ids.dtype == torch.long and c.token_ids.tolist() == [3, 4, 5]
    assert c.logprobs is not None and c.logprobs.dtype == torch.float32
    assert torch.allclose(c.logprobs, torch.tensor([-0.1, -0.2, -0.3]))
    assert completion([1], torch.tensor([7, 8], dtype=torch.int32)).token_ids.dtype == torch.long


def test_request_tensor_left_pads_and_keeps_the_end() -> None:
    ep = Episode(pad_id=0, request_len=5, response_len=4, completion=completion([11, 12, 13], [21, 22]))
    assert ep.request_tensor.tolist() == [0, 0, 11, 12, 13]
    long = Episode(pad_id=0, request_len=2, completion=completion([11, 12, 13], [21]))
    assert long.request_tensor.tolist() == [12, 13]  # the tokens right before the response
    exact = Episode(pad_id=9, completion=completion([11, 12], [21]))
    assert exact.request_tensor.tolist() == [11, 12]  # request_len 0: no padding


def test_response_tensor_right_pads_and_truncates() -> None:
    ep = Episode(pad_id=0, request_len=3, response_len=4, completion=completion([1], [21, 22]))
    assert ep.response_tensor.tolist() == [21, 22, 0, 0]
    assert ep.response_mask.tolist() == [1.0, 1.0, 0.0, 0.0]
    cut = Episode(pad_id=0, response_len=2, completion=completion([1], [21, 22, 23]))
    assert cut.response_tensor.tolist() == [21, 22] and cut.response_mask.tolist() == [1.0, 1.0]
    empty = Episode(pad_id=5, response_len=3, completion=completion([1], []))
    assert empty.response_tensor.tolist() == [5, 5, 5] and empty.response_mask.sum() == 0


def test_loss_mask_zeroes_environment_tokens() -> None:
    ep = Episode(pad_id=0, response_len=6, completion=completion([1], [21, 22, 23, 24]),
                 loss_mask=torch.tensor([1, 0, 0, 1]))
    assert ep.response_mask.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert ep.response_mask.dtype == torch.float32


def test_episode_defaults_are_independent() -> None:
    a, b = Episode(), Episode()
    assert a.episode_id != b.episode_id
    a.reward_breakdown["x"] = 1.0
    a.metadata["k"] = 1
    assert b.reward_breakdown == {} and b.metadata == {}
