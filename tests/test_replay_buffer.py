import asyncio
import random

import pytest
import torch

from forge.actors.replay_buffer import ReplayBuffer
from forge.data.collate import collate_episodes
from forge.types import Completion, Episode


def make_episode(version: int, group: str, p_len: int, r_len: int, pad_id: int = 0) -> Episode:
    prompt = torch.randint(1, 50, (p_len,))
    resp = torch.randint(1, 50, (r_len,))
    c = Completion(prompt="p", text="t", prompt_ids=prompt, token_ids=resp,
                   logprobs=-torch.rand(r_len), generator_version=version)
    return Episode(policy_version=version, pad_id=pad_id, completion=c, advantage=random.uniform(-1, 1),
                   ref_logprobs=-torch.rand(r_len), metadata={"group_id": group})


def run(coro):
    return asyncio.run(coro)


def test_collate_pads_left_and_right_with_masks():
    eps = [make_episode(0, "g", p, r) for p, r in [(3, 5), (6, 2), (1, 1)]]
    (inputs,), (targets,) = collate_episodes(eps)
    tokens, pm = inputs["tokens"], inputs["prompt_mask"]
    assert tokens.shape == (3, 6 + 5)
    for i, e in enumerate(eps):
        p, r = e.completion.prompt_ids, e.completion.token_ids
        assert torch.equal(tokens[i, 6 - len(p):6], p)
        assert pm[i].sum() == len(p) and pm[i, 6 - len(p):].all()
        assert torch.equal(targets["response"][i, : len(r)], r)
        assert targets["padding_mask"][i].sum() == len(r)
        assert torch.allclose(targets["generator_logprobs"][i, : len(r)], e.completion.logprobs)
        assert torch.allclose(targets["ref_logprobs"][i, : len(r)], e.ref_logprobs)
        assert targets["advantages"][i, 0] == pytest.approx(e.advantage)


def test_collate_loss_mask_zeroes_env_tokens():
    e = make_episode(0, "g", 2, 6)
    e.loss_mask = torch.tensor([1, 1, 0, 0, 1, 1])
    (_,), (targets,) = collate_episodes([e])
    assert targets["padding_mask"][0].tolist() == [1, 1, 0, 0, 1, 1]


def test_buffer_groups_staleness_and_resample():
    async def main():
        buf = ReplayBuffer(batch_size=4, dp_size=1, max_policy_age=1, group_size=2, seed=0)
        for g in range(3):
            for _ in range(2):
                await buf.add(make_episode(version=0, group=f"g{g}", p_len=3, r_len=4))
        # an incomplete group is never sampled
        await buf.add(make_episode(version=0, group="partial", p_len=3, r_len=4))
        batch = await buf.sample(curr_policy_version=1)
        assert batch is not None
        (inputs,), _ = batch
        assert inputs["tokens"].shape[0] == 4
        # used groups are gone (max_resample_count=0); one complete group left -> not enough
        assert await buf.sample(curr_policy_version=1) is None
        # version 2: age 2 > max_policy_age 1 -> evicted
        await buf.add(make_episode(version=2, group="partial", p_len=3, r_len=4))
        assert await buf.evict(2) >= 1
        assert await buf.size() == 0

    run(main())


def test_buffer_rejects_split_groups_and_restores_state():
    with pytest.raises(ValueError, match="multiple of group_size"):
        ReplayBuffer(batch_size=3, group_size=2)

    async def main():
        buf = ReplayBuffer(batch_size=2, max_policy_age=0, seed=1)
        for _ in range(5):
            await buf.add(make_episode(version=3, group="x", p_len=2, r_len=2))
        state = await buf.state_dict()
        b1 = await buf.sample(3)
        buf2 = ReplayBuffer(batch_size=2, max_policy_age=0, seed=99)
        await buf2.load_state_dict(state)
        b2 = await buf2.sample(3)
        assert torch.equal(b1[0][0]["tokens"], b2[0][0]["tokens"])

    run(main())


def test_buffer_state_survives_a_checkpoint_file(tmp_path):
    """The trainer checkpoint stores the buffer's state and reads it back with
    torch.load(weights_only=True): the state must be plain data, and sample the same after."""
    seed = random.randint(0, 10_000)

    async def main():
        buf = ReplayBuffer(batch_size=4, max_policy_age=2, group_size=2, seed=seed, max_resample_count=1)
        for g in range(6):
            for _ in range(2):
                await buf.add(make_episode(version=g % 3, group=f"g{g}", p_len=random.randint(1, 5), r_len=3))
        await buf.sample(2)  # sample counts and the RNG have moved
        torch.save({"extra": {"replay_buffer": await buf.state_dict()}}, tmp_path / "state.pt")
        state = torch.load(tmp_path / "state.pt", weights_only=True)["extra"]["replay_buffer"]
        buf2 = ReplayBuffer(batch_size=4, max_policy_age=2, group_size=2, seed=seed + 1, max_resample_count=1)
        await buf2.load_state_dict(state)
        assert await buf2.size() == await buf.size()
        for v in (2, 2, 3):
            a, b = await buf.sample(v), await buf2.sample(v)
            assert (a is None) == (b is None)
            if a is not None:
                for k in ("tokens",):
                    assert torch.equal(a[0][0][k], b[0][0][k])
                for k in ("response", "advantages", "generator_logprobs", "ref_logprobs"):
                    assert torch.equal(a[1][0][k], b[1][0][k])

    run(main())


def test_buffer_choice_does_not_depend_on_arrival_order():
    """Two rollout tasks finish their groups in a timing-dependent order; the batch drawn from the
    same groups with the same seed must not depend on it (issue 29 item 7)."""
    seed = random.randint(0, 10_000)
    groups = {f"r0-e0-i{i:08d}": [make_episode(version=0, group=f"r0-e0-i{i:08d}", p_len=random.randint(1, 6),
                                               r_len=random.randint(1, 6)) for _ in range(2)] for i in range(16)}

    async def batch(order: list[str]):
        buf = ReplayBuffer(batch_size=4, max_policy_age=1, group_size=2, seed=seed)
        for k in order:
            await buf.add_group(groups[k])
        return await buf.sample(0)

    keys = list(groups)
    shuffled = keys[:]
    while shuffled == keys:
        random.shuffle(shuffled)
    a, b = run(batch(keys)), run(batch(shuffled))
    assert torch.equal(a[0][0]["tokens"], b[0][0]["tokens"])
    assert torch.equal(a[1][0]["advantages"], b[1][0]["advantages"])


def test_buffer_collate_by_registered_name_or_import_path():
    from forge.config.registry import UnknownNameError

    assert ReplayBuffer(collate="episodes").collate is collate_episodes
    assert ReplayBuffer(collate="forge.data.collate:collate_episodes").collate is collate_episodes
    assert ReplayBuffer(collate="tests.test_replay_buffer.make_episode").collate.__name__ == "make_episode"
    with pytest.raises(UnknownNameError, match="unknown collate 'episode'. Did you mean 'episodes'"):
        ReplayBuffer(collate="episode")
