"""The Generator service: text / chat / token prompts, stop strings, concurrency, weight updates."""

from __future__ import annotations

import asyncio

import pytest
import torch

from forge.actors.generator import Generator
from forge.engine import EngineConfig, LLMEngine, SamplingParams
from forge.models import build_tiny_model, load_tokenizer, tiny_tokenizer_path, write_tiny_checkpoint

ENGINE = dict(max_num_seqs=16, max_model_len=128, block_size=8)
GREEDY = dict(temperature=0.0, max_tokens=12)


def reference(model, ids, n=12):
    eng = LLMEngine(model, EngineConfig(**ENGINE), eos_token_ids=[])
    return eng.generate([(ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))])[0].outputs[0].token_ids


def make(seed=1, **kw):
    return Generator(model=build_tiny_model("qwen2", seed=seed), engine=ENGINE,
                     sampling={**GREEDY, "ignore_eos": True}, tokenizer=str(tiny_tokenizer_path()), **kw)


def test_generate_text_messages_and_tokens():
    async def main():
        gen = make()
        tok = load_tokenizer(tiny_tokenizer_path())
        comps = await gen.generate("What is 2+3?", n=2, sampling={"temperature": 1.0, "seed": 5})
        assert len(comps) == 2 and comps[0].prompt == "What is 2+3?"
        for c in comps:
            assert c.prompt_ids.tolist() == tok.encode("What is 2+3?")
            assert c.logprobs.dtype == torch.float32 and c.logprobs.shape == c.token_ids.shape
            assert c.stop_reason == "length" and len(c.token_ids) == 12 and c.generator_version == 0
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        chat = await gen.generate(messages=[{"role": "user", "content": "hi"}])
        assert "<|im_start|>assistant" in chat[0].prompt
        ids = tok.encode("hello")
        by_ids = await gen.generate(token_ids=ids)
        assert by_ids[0].token_ids.tolist() == reference(build_tiny_model("qwen2", seed=1), ids)
        with pytest.raises(ValueError, match="exactly one"):
            await gen.generate("a", token_ids=[1])
        with pytest.raises(ValueError, match="empty prompt"):
            await gen.generate(token_ids=[])
        with pytest.raises(ValueError, match="must be integers"):  # not truncated to a token
            await gen.generate(token_ids=[ids[0], 2.5])
        with pytest.raises(ValueError, match=r"must be in \[0, "):  # before the tokenizer decodes it
            await gen.generate(token_ids=[ids[0], 10**6])
        assert (await gen.generate("still alive"))[0].stop_reason == "length"  # a bad request never kills the engine
        await gen.teardown()

    asyncio.run(main())


def test_stop_strings_cut_text():
    async def main():
        gen = make(seed=2)
        sp = {"max_tokens": 30, "temperature": 1.0, "seed": 11}
        full = (await gen.generate("abc", sampling=sp))[0]
        text = full.text
        i = next(i for i in range(4, len(text) - 2) if text.find(text[i : i + 2]) == i)
        stop = text[i : i + 2]
        cut = (await gen.generate("abc", sampling={**sp, "stop": [stop]}))[0]
        assert cut.stop_reason == "stop" and cut.text == text[: text.find(stop)]
        assert full.token_ids[: len(cut.token_ids)].tolist() == cut.token_ids.tolist()
        await gen.teardown()

    asyncio.run(main())


def test_concurrent_calls_batch_together():
    async def main():
        gen = make(seed=3)
        prompts = ["one", "two two two two two", "3", "four four", "five!" * 9, "six"]
        outs = await asyncio.gather(*[gen.generate(p) for p in prompts])
        tok, ref_model = gen.tokenizer, build_tiny_model("qwen2", seed=3)
        for p, o in zip(prompts, outs):
            assert o[0].token_ids.tolist() == reference(ref_model, tok.encode(p))
        # 6 requests x 12 tokens: batched decode takes far fewer steps than 72
        assert gen.engine.stats["steps"] < 40
        await gen.teardown()

    asyncio.run(main())


def test_update_weights_in_place_changes_outputs():
    async def main():
        gen = make(seed=4)
        ids = [5, 6, 7, 8]
        before = (await gen.generate(token_ids=ids))[0].token_ids.tolist()
        new = build_tiny_model("qwen2", seed=5)
        ptrs = {n: p.data_ptr() for n, p in gen.engine.model.named_parameters()}
        keys = await gen.get_model_state_dict_keys()
        assert "model.layers.0.self_attn.q_proj.weight" in keys
        # a request in flight while the update arrives finishes on the old weights
        inflight = asyncio.create_task(gen.generate(token_ids=ids, sampling={"max_tokens": 40}))
        await asyncio.sleep(0)
        assert await gen.update_weights(7, new.state_dict()) == 7
        old = await inflight
        assert old[0].generator_version == 0
        assert old[0].token_ids.tolist()[:12] == before
        after = (await gen.generate(token_ids=ids))[0]
        assert await gen.get_version() == 7 and after.generator_version == 7
        assert after.token_ids.tolist() == reference(build_tiny_model("qwen2", seed=5), ids) != before
        assert ptrs == {n: p.data_ptr() for n, p in gen.engine.model.named_parameters()}
        with pytest.raises(KeyError, match="unknown parameter"):
            await gen.update_weights(8, {"nope": torch.zeros(1)})
        await gen.teardown()

    asyncio.run(main())


def test_service_from_checkpoint_dir(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "ckpt", "qwen2", seed=6)

    async def main():
        svc = await Generator.as_service(model=str(path), engine=ENGINE,
                                         sampling_params={"temperature": 0.0, "max_tokens": 8, "top_k": -1})
        comps = await svc.generate.route("2+2=", n=2)
        assert len(comps) == 2 and comps[0].token_ids.tolist() == comps[1].token_ids.tolist()
        assert comps[0].stop_reason in ("stop", "length")
        await svc.shutdown()

    asyncio.run(main())


def test_truncated_long_prompt_returns_the_kept_ids_and_trains():
    """A prompt longer than the context was generated from its truncated tail but returned with
    the full ids: the first train step scored a context the sampler never saw and indexed RoPE
    past the model's positions (IndexError, issue 29 item 5)."""
    import random

    from forge.data.collate import collate_episodes
    from forge.observability import drain
    from forge.trainer.engine import TrainEngine
    from forge.types import Episode

    rng = random.Random()
    seed, ctx, max_tokens = rng.randrange(1000), 64, 8
    ids = [rng.randrange(3, 512) for _ in range(rng.randint(2 * ctx, 3 * ctx))]

    async def sample():
        gen = Generator(model=build_tiny_model("qwen2", seed=seed, max_position_embeddings=ctx),
                        engine=dict(max_num_seqs=8, max_model_len=ctx, block_size=8, long_prompt="truncate"),
                        sampling={"temperature": 1.0, "max_tokens": max_tokens, "ignore_eos": True},
                        tokenizer=str(tiny_tokenizer_path()))
        comps = await gen.generate(token_ids=ids, n=4, sampling={"seed": seed})
        await gen.teardown()
        return comps

    comps = asyncio.run(sample())
    kept = ids[-(ctx - max_tokens):]
    for c in comps:
        assert c.prompt_ids.tolist() == kept, "prompt_ids must be exactly what was generated from"
        assert c.metadata["prompt_truncated"] is True and c.metadata["truncated_prompt_tokens"] == len(ids) - len(kept)
        assert len(c.prompt_ids) + len(c.token_ids) <= ctx
    eps = [Episode(request="long", pad_id=0, request_len=len(c.prompt_ids), response_len=len(c.token_ids),
                   completion=c, reward=float(i), advantage=rng.uniform(-1, 1)) for i, c in enumerate(comps)]
    trainer = TrainEngine({"model": {"tiny": "qwen2", "seed": seed, "max_position_embeddings": ctx},
                           "loss": {"name": "grpo", "beta": 0.0}, "optimizer": {"lr": 1e-4}})
    drain()
    loss = trainer.train_step(*collate_episodes(eps))
    assert torch.isfinite(torch.tensor(loss))
    # same weights, same context: the trainer's logprobs are the generator's
    kl = [r.value for r in drain() if r.key == "loss/mismatch_kl"]
    assert kl and abs(kl[0]) < 1e-3, kl


def test_tensor_parallel_size_must_match_the_replica_and_the_transport():
    with pytest.raises(ValueError, match=r"procs=1 .*tensor_parallel_size=2 must equal procs"):
        make(engine_args={"tensor_parallel_size": 2})  # vLLM's key is honoured, never ignored
    with pytest.raises(ValueError, match=r"procs=1 .*tensor_parallel_size=2 must equal procs"):
        Generator(model=build_tiny_model("qwen2"), engine={**ENGINE, "tensor_parallel_size": 2})
    from forge.controller.actor import construct_actor

    with pytest.raises(ValueError, match="transport 'broadcast' .*tensor_parallel_size=2 use shm, cuda_ipc"):
        construct_actor(Generator, {"model": build_tiny_model("qwen2"), "engine": {**ENGINE, "tensor_parallel_size": 2},
                                    "weight_sync": {"transport": "broadcast"}},
                        rank=0, world_size=2, replica_id=0, device=torch.device("cpu"))


@pytest.mark.monarch
def test_tensor_parallel_generator_on_two_monarch_procs(tmp_path):
    """A Generator replica of procs=2 at tensor_parallel_size=2 (gloo between two Monarch procs): the same
    tokens and logprobs as one process, and update_weights on every rank == a fresh engine of the new weights."""
    pytest.importorskip("monarch")
    from forge.controller import init_provisioner, shutdown

    seed = int(torch.randint(0, 10_000, (1,)))
    path = write_tiny_checkpoint(tmp_path / "m", "qwen2", seed=seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 19)]
    new = build_tiny_model("qwen2", seed=seed + 1).state_dict()

    async def main():
        init_provisioner("monarch")
        try:
            svc = await Generator.options(procs=2).as_service(
                model=str(path), engine={**ENGINE, "tensor_parallel_size": 2}, sampling={**GREEDY, "ignore_eos": True})
            before = [(await svc.generate.route(token_ids=p))[0] for p in prompts]
            assert await svc.update_weights.fanout(7, new) == [7]
            after = [(await svc.generate.route(token_ids=p))[0] for p in prompts]
            return before, after
        finally:
            await shutdown()

    before, after = asyncio.run(main())
    from forge.models.hf_io import load_model

    for model, got in ((load_model(path), before), (build_tiny_model("qwen2", seed=seed + 1), after)):
        eng = LLMEngine(model, EngineConfig(**ENGINE), eos_token_ids=[])
        want = eng.generate([(p, SamplingParams(**GREEDY, ignore_eos=True)) for p in prompts])
        for c, w in zip(got, want):
            assert c.token_ids.tolist() == w.outputs[0].token_ids
            torch.testing.assert_close(c.logprobs, torch.tensor(w.outputs[0].logprobs), atol=1e-5, rtol=0)
    assert {c.generator_version for c in after} == {7}
