"""Code typed from torchforge's docs and apps/grpo/main.py runs on forge: its imports, its
`@monarch.actor.endpoint`, and the keywords its loop passes to forge's actors."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
import torch

from forge.models import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny", "qwen2", seed=0))


def test_torchforge_import_lines():
    from apps.grpo.main import ComputeAdvantages, DatasetActor, Group, RewardActor, collate, simple_grpo_loss  # noqa: F401
    from forge.actors.trainer import RLTrainer, TitanTrainer, Trainer
    from forge.data_models.completion import Completion
    from forge.data_models.episode import Episode
    from forge.observability import get_or_create_metric_logger  # noqa: F401
    from forge.observability.metric_actors import get_or_create_metric_logger as g2  # noqa: F401
    from forge.observability.perf_tracker import Tracer, trace  # noqa: F401
    from forge.types import LauncherConfig, ProvisionerConfig  # noqa: F401
    from forge.util.config import parse  # noqa: F401

    assert TitanTrainer is Trainer and RLTrainer is Trainer
    import forge.types

    assert Completion is forge.types.Completion and Episode is forge.types.Episode
    with pytest.raises(NotImplementedError, match="init_provisioner\\('monarch', job='slurm'"):
        LauncherConfig(launcher="slurm")


def test_monarch_endpoint_decorator_is_an_endpoint():
    monarch_actor = pytest.importorskip("monarch.actor")
    from forge.controller import ForgeActor, init_provisioner, shutdown

    class Counter(ForgeActor):
        def __init__(self, start: int = 0):
            self.value = start

        @monarch_actor.endpoint
        async def increment(self, by: int = 1) -> int:
            self.value += by
            return self.value

    async def main():
        init_provisioner("local")
        start, by = random.randint(0, 100), random.randint(1, 9)
        c = await Counter.options(num_replicas=1).as_service(start=start)
        assert await c.increment.route(by) == start + by
        await shutdown()

    asyncio.run(main())


def test_generate_route_returns_the_configured_n_and_takes_torchforge_keywords(tiny):
    from forge.actors.generator import Generator

    n = random.randint(2, 5)

    async def main():
        gen = Generator(model=tiny, engine={"max_num_seqs": 16, "max_model_len": 64, "block_size": 8},
                        sampling_params={"n": n, "max_tokens": 4, "temperature": 1.0})
        assert len(await gen.generate("What is 2+3?")) == n  # torchforge: the configured sampling_params.n
        two = await gen.generate("What is 2+3?", sampling_params={"n": 2, "max_tokens": 3}, priority=0)
        assert len(two) == 2 and all(len(c.token_ids) <= 3 for c in two)
        assert len(await gen.generate("x", n=1)) == 1
        with pytest.raises(ValueError, match="no priorities"):
            await gen.generate("x", priority=1)
        await gen.teardown()

    asyncio.run(main())


def _completion(version: int, r: int = 3):
    from forge.types import Completion

    return Completion(prompt="p", text="t", prompt_ids=torch.randint(0, 50, (4,)),
                      token_ids=torch.randint(0, 50, (r,)), logprobs=-torch.rand(r), generator_version=version)


def test_episode_policy_version_comes_from_the_completion():
    from forge.types import Episode

    v = random.randint(1, 50)
    assert Episode(completion=_completion(v)).policy_version == v
    assert Episode(completion=_completion(v), policy_version=v - 1).policy_version == v - 1
    assert Episode().policy_version == 0


def test_episode_from_ids_as_torchforge_docs_write_it():
    """torchforge's "Writing RL Code": `Episode(prompt_ids=response.prompt_ids, response_ids=response.token_ids, reward=r)`."""
    from forge.actors.replay_buffer import ReplayBuffer
    from forge.types import Episode

    completion = _completion(random.randint(1, 9), r=5)
    r = random.random()
    ep = Episode(prompt_ids=completion.prompt_ids, response_ids=completion.token_ids, reward=r, advantage=r - 0.5)
    assert torch.equal(ep.prompt_ids, completion.prompt_ids) and torch.equal(ep.response_ids, completion.token_ids)
    assert ep.reward == r and ep.policy_version == 0 and torch.equal(ep.response_mask, torch.ones(5))
    with pytest.raises(TypeError, match="needs both"):
        Episode(prompt_ids=completion.prompt_ids)
    with pytest.raises(TypeError, match="not both"):
        Episode(prompt_ids=completion.prompt_ids, response_ids=completion.token_ids, completion=completion)

    async def main():  # such an episode trains: the buffer batches it like any other
        rb = ReplayBuffer(batch_size=2, max_policy_age=0, seed=0)
        for _ in range(2):
            await rb.add(Episode(prompt_ids=completion.prompt_ids, response_ids=completion.token_ids, advantage=1.0))
        return await rb.sample(curr_policy_version=0)

    batch = asyncio.run(main())
    assert batch is not None


def test_replay_buffer_user_collate_gets_dp_by_bsz_and_sample_takes_batch_size():
    from forge.actors.replay_buffer import ReplayBuffer
    from forge.compat import collate
    from forge.types import Episode

    seen = []

    def my_collate(batches):
        seen.append([len(b) for b in batches])
        return collate(batches)

    async def main():
        rb = ReplayBuffer(batch_size=3, dp_size=2, max_policy_age=1, collate=my_collate, seed=0)
        for _ in range(10):
            await rb.add(Episode(completion=_completion(4), advantage=random.gauss(0, 1)))
        inputs, targets = await rb.sample(curr_policy_version=4)
        assert seen[-1] == [3, 3] and len(inputs) == 2 and inputs[0]["tokens"].shape[0] == 3
        inputs, _ = await rb.sample(curr_policy_version=5, batch_size=2)
        assert seen[-1] == [2, 2]
        assert await rb.sample(curr_policy_version=5, batch_size=2) is None  # 2 left, 4 needed

    asyncio.run(main())


def _torchforge_simple_grpo_loss(logits, response, ref_logprobs, advantages, padding_mask, beta=0.1):
    # torchforge's formula, written out here from its documented definition
    lp = torch.log_softmax(logits[:, -response.shape[1] - 1:-1].float(), -1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
    kl = torch.exp(ref_logprobs - lp) - (ref_logprobs - lp) - 1
    per_token = -(torch.exp(lp - lp.detach()) * advantages - beta * kl)
    return ((per_token * padding_mask).sum(1) / padding_mask.sum(1).clamp(min=1.0)).mean()


def test_simple_grpo_loss_alias_matches_torchforge_formula():
    from forge.compat import simple_grpo_loss

    b, p, r, v = 3, 5, 6, 11
    logits = torch.randn(b, p + r, v)
    response = torch.randint(0, v, (b, r))
    ref = -torch.rand(b, r) * 3
    adv = torch.randn(b, 1)
    mask = (torch.rand(b, r) > 0.3).float()
    mask[:, 0] = 1
    got = simple_grpo_loss(logits, response, ref, adv, mask, beta=0.1)
    assert torch.allclose(got, _torchforge_simple_grpo_loss(logits, response, ref, adv, mask), atol=1e-5)


def test_trainer_takes_a_loss_function_push_weights_policy_version_and_tokenizer_pad(tiny, tmp_path):
    from forge.actors.trainer import Trainer
    from forge.compat import simple_grpo_loss
    from forge.losses import SimpleGRPOLoss
    from forge.models import load_tokenizer

    # a model dir whose config has another pad id than its tokenizer: the tokenizer's wins
    cfg = json.loads(open(f"{tiny}/config.json").read())
    tok_pad = load_tokenizer(tiny).pad_token_id
    assert tok_pad is not None
    cfg["pad_token_id"] = tok_pad + 1
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny, d)
    (d / "config.json").write_text(json.dumps(cfg))

    t = Trainer(model={"path": str(d)}, loss=simple_grpo_loss)
    assert t.cfg.training.pad_id == tok_pad
    assert t.cfg.loss == {"name": "simple_grpo", "beta": 0.1}

    calls = []

    def on_logprobs(logprobs, ref_logprobs, advantages, padding_mask):
        calls.append(logprobs.shape)
        return -((logprobs * advantages) * padding_mask).sum() / padding_mask.sum()

    def on_logits(logits, response, advantages, padding_mask):
        return logits.sum()

    with pytest.raises(TypeError, match="never materialises logits"):
        Trainer(model={"path": str(d)}, loss=on_logits)

    from forge.types import Episode

    async def main():
        tr = Trainer(model={"path": str(d)}, loss=on_logprobs, optimizer={"lr": 1e-3})
        await tr.setup()
        eps = [Episode(completion=_completion(0, r=4), advantage=random.gauss(0, 1), pad_id=tok_pad,
                       ref_logprobs=-torch.rand(4)) for _ in range(4)]
        from forge.compat import collate

        inputs, targets = collate([eps])
        loss = await tr.train_step(inputs, targets)
        assert calls and torch.isfinite(torch.tensor(loss))
        assert await tr.push_weights(policy_version=1) == 1
        with pytest.raises(TypeError, match="once"):
            await tr.push_weights(1, policy_version=1)

    asyncio.run(main())
    assert isinstance(SimpleGRPOLoss(), torch.nn.Module)


def test_reference_model_forward_takes_max_req_tokens_keyword(tiny):
    from forge.actors.reference_model import ReferenceModel
    from forge.models import load_tokenizer

    async def main():
        ref = ReferenceModel(model=f"hf://{tiny}", training={"dtype": "float32"})
        assert ref.pad_id == load_tokenizer(tiny).pad_token_id
        await ref.setup()
        p, r = 5, 4
        ids = torch.randint(1, 50, (2, p + r))
        a = await ref.forward(ids, max_req_tokens=p, return_logprobs=True)
        b = await ref.forward(ids, p)
        assert a.shape == (2, r) and torch.equal(a, b)

    asyncio.run(main())


def test_tracer_and_global_logger(tmp_path):
    from forge.observability import drain, record_metric
    from forge.observability.metric_actors import get_or_create_metric_logger
    from forge.observability.perf_tracker import Tracer, trace

    drain()
    t = Tracer("trainer_perf/step")
    t.start()
    t.step("fwd")
    t.stop()

    @trace("dataset_perf")
    def f(x):
        return x + 1

    assert f(1) == 2

    async def main():
        m = await get_or_create_metric_logger(process_name="Controller")
        m.run_dir = str(tmp_path)
        await m.init_backends.call_one({"jsonl": {"logging_mode": "global_reduce"}})
        val = random.random()
        record_metric("x/y", val)
        out = await m.flush.call_one(3)
        await m.shutdown.call_one()
        return out

    from forge.controller import init_provisioner

    init_provisioner("local")
    out = asyncio.run(main())
    assert {"trainer_perf/step/fwd/duration_avg_s", "trainer_perf/step/total_duration_avg_s",
            "dataset_perf/total_duration_avg_s", "x/y"} <= set(out)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 3 and row["x/y"] == pytest.approx(out["x/y"])


def test_replay_buffer_refuses_episodes_that_can_never_be_used():
    from forge.actors.replay_buffer import ReplayBuffer
    from forge.types import Episode

    async def main():
        rb = ReplayBuffer(batch_size=2, dp_size=1, max_policy_age=1, seed=0)
        for _ in range(2):
            await rb.add(Episode(completion=_completion(0), advantage=random.gauss(0, 1)))
        assert await rb.sample(curr_policy_version=0) is not None
        assert await rb.sample(curr_policy_version=3) is None
        # one stale arrival is tolerated (in flight during a weight update); a fresh one resets the count
        await rb.add(Episode(completion=_completion(1), advantage=0.5, policy_version=1))
        await rb.add(Episode(completion=_completion(3), advantage=0.5))
        with pytest.raises(ValueError, match="arrived already too old"):
            for _ in range(4):  # torchforge's hang: a constant policy_version 0
                await rb.add(Episode(completion=_completion(3), advantage=0.5, policy_version=0))

    asyncio.run(main())


def test_ported_torchforge_grpo_loop_trains_without_hanging(tiny, tmp_path):
    """torchforge's apps/grpo/main.py loop, its imports and calls, on forge's local provisioner:
    a group per prompt from `generate.route(prompt)`, episodes whose policy_version comes from
    their completion, reference logprobs by (input_ids, max_req_tokens), torchforge's collate
    and simple_grpo_loss, push_weights(policy_version=)."""
    import pandas as pd

    from apps.grpo.main import ComputeAdvantages, DatasetActor, RewardActor, collate, simple_grpo_loss
    from forge.actors.generator import Generator
    from forge.actors.reference_model import ReferenceModel
    from forge.actors.replay_buffer import ReplayBuffer
    from forge.actors.trainer import TitanTrainer
    from forge.controller.provisioner import init_provisioner, shutdown
    from forge.data.rewards import MathReward, ThinkingReward
    from forge.data_models.completion import Completion
    from forge.data_models.episode import Episode

    rows = [{"question": f"{a}+{b}?", "answer": f"x\n#### {a + b}"} for a, b in
            ((random.randint(1, 9), random.randint(1, 9)) for _ in range(16))]
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    group_size, max_req_tokens, max_res_tokens, steps = 4, 24, 4, 3

    async def main():
        init_provisioner("local")
        dataloader, policy, trainer, buffer, adv, reward, ref = await asyncio.gather(
            DatasetActor.options(procs=1).as_actor(path=str(tmp_path / "train.parquet"), model=tiny,
                                                    columns={"prompt": "question", "target": "answer"},
                                                    target_format="gsm8k"),
            Generator.options(procs=1, num_replicas=1).as_service(
                model=tiny, engine_args={"max_model_len": 64},
                sampling_params={"n": group_size, "max_tokens": max_res_tokens}),
            TitanTrainer.options(procs=1).as_actor(model={"hf_assets_path": f"hf://{tiny}"}, loss=simple_grpo_loss,
                                                  optimizer={"lr": 1e-4}),
            ReplayBuffer.options(procs=1).as_actor(batch_size=group_size, max_policy_age=1, dp_size=1,
                                                   collate=collate),
            ComputeAdvantages.options(procs=1).as_actor(),
            RewardActor.options(procs=1, num_replicas=1).as_service(reward_functions=[MathReward(), ThinkingReward()]),
            ReferenceModel.options(procs=1, num_replicas=1).as_service(model={"hf_assets_path": f"hf://{tiny}"},
                                                                       training={"dtype": "float32"}),
        )
        pad_id = await dataloader.pad_token.call_one()

        async def rollout_once():
            sample = await dataloader.sample.call_one()
            prompt, target = sample["request"], sample["target"]
            responses: list[Completion] = await policy.generate.route(prompt)
            assert len(responses) == group_size
            input_ids = torch.ones((group_size, max_req_tokens + max_res_tokens), dtype=torch.long)
            episodes = []
            for i, response in enumerate(responses):
                ep = Episode(pad_id=pad_id, request_len=max_req_tokens, response_len=max_res_tokens, target=target,
                             request=prompt, completion=response)
                ep.reward = await reward.evaluate_response.route(prompt=prompt, response=response.text, target=target)
                episodes.append(ep)
                input_ids[i, :max_req_tokens] = ep.request_tensor
                input_ids[i, max_req_tokens:] = ep.response_tensor
            ref_logprobs = await ref.forward.route(input_ids, max_req_tokens, return_logprobs=True)
            for i, ep in enumerate(episodes):
                ep.ref_logprobs = ref_logprobs[i]
            for ep, a in zip(episodes, await adv.compute.call_one(episodes)):
                ep.advantage = a
                await buffer.add.call_one(ep)

        for step in range(steps):
            batch = None
            for _ in range(4):  # never forever: the ported loop must find a batch within a few rollouts
                await rollout_once()
                batch = await buffer.sample.call_one(curr_policy_version=step)
                if batch is not None:
                    break
            assert batch is not None, f"step {step}: the buffer never produced a batch"
            inputs, targets = batch
            await trainer.train_step.call(inputs, targets)
            await trainer.push_weights.call(policy_version=step + 1)
            await policy.update_weights.fanout(step + 1)
        await shutdown()

    asyncio.run(main())
