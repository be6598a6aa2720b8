"""LoRA through the trainer: adapter-only publishing, the generator's merge equals a fresh engine
built from the merged weights, DCP checkpoints hold adapters + optimizer and resume exactly."""

from __future__ import annotations

import asyncio

import pytest
import torch

from forge.actors.generator import Generator
from forge.models import build_tiny_model
from forge.models.lora import adapter_parameters, merged_state_dict
from forge.trainer.engine import TrainEngine
from forge.weight_sync import WeightPublisher, clear_registry

ENGINE = dict(max_num_seqs=16, max_model_len=128, block_size=8)
LORA = {"r": 4, "alpha": 8, "target_modules": "all-linear"}


def lora_engine(tmp_path=None, **over):
    cfg = {"model": {"tiny": "qwen2", "seed": 3, "lora": LORA}, "optimizer": {"lr": 1e-2}, "loss": {"name": "grpo", "beta": 0.0},
           "training": {"dtype": "float32", "pad_id": 0}, **over}
    if tmp_path is not None:
        cfg["checkpoint"] = {"dir": str(tmp_path / "ckpt")}
    return TrainEngine(cfg)


def randomise(engine, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(engine.model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def rl_batch(seed, b=4, p=6, r=5):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 500, (b, p + r), generator=g)
    targets = {"response": tokens[:, p:], "padding_mask": torch.ones(b, r), "advantages": torch.randn(b, 1, generator=g),
               "generator_logprobs": -torch.rand(b, r, generator=g)}
    return [{"tokens": tokens}], [targets]


def test_only_adapters_trained_and_published():
    eng = lora_engine()
    opt_params = [p for g in eng.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in opt_params} == {id(p) for p in adapter_parameters(eng.model)}
    names = [n for n, _ in eng.publish_source().named_parameters()]
    assert names and all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in names)
    base = {n: p.detach().clone() for n, p in eng.model.named_parameters() if "lora_" not in n}
    eng.train_step(*rl_batch(1))
    assert all(torch.equal(base[n], p) for n, p in eng.model.named_parameters() if "lora_" not in n)
    assert any(p.abs().sum() > 0 for n, p in eng.model.named_parameters() if "lora_B" in n)  # B left zero-init
    with eng.base_model():  # adapters off = the base model
        lp_base = eng.forward_logprobs(*rl_batch(2))
    torch.testing.assert_close(eng.forward_logprobs(*rl_batch(2), base=True), lp_base)
    assert (eng.forward_logprobs(*rl_batch(2)) - lp_base).abs().max() > 1e-4


@pytest.mark.parametrize("transport", ["inproc", "shm"])
def test_generator_after_lora_sync_equals_fresh_merged_engine(transport, tmp_path):
    name = f"lora_sync_{transport}"
    kw = {"directory": str(tmp_path)} if transport == "shm" else {}
    eng = lora_engine()
    pub = WeightPublisher(eng.publish_source(), transport, name=name, **kw)
    gen = Generator(model=build_tiny_model("qwen2", seed=3), engine=ENGINE, weight_sync={"transport": transport,
                    "name": name, **kw}, sampling={"temperature": 1.0, "max_tokens": 16, "ignore_eos": True, "seed": 5})
    ids = [5, 6, 7, 8, 9]

    async def main():
        for version in (1, 2):  # version 2 merges from the kept base, not on top of version 1
            randomise(eng, 10 + version)
            pub.publish(version)
            assert await gen.update_weights(version) == version
            fresh_model = build_tiny_model("qwen2", seed=3)
            fresh_model.load_state_dict(merged_state_dict(eng.model))
            fresh = Generator(model=fresh_model, engine=ENGINE,
                              sampling={"temperature": 1.0, "max_tokens": 16, "ignore_eos": True, "seed": 5})
            a = (await gen.generate(token_ids=ids, sampling={"seed": 7}))[0]
            b = (await fresh.generate(token_ids=ids, sampling={"seed": 7}))[0]
            assert a.generator_version == version
            assert a.token_ids.tolist() == b.token_ids.tolist()
            torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
            await fresh.teardown()
        await gen.teardown()

    try:
        asyncio.run(main())
    finally:
        clear_registry(name)
        if hasattr(pub, "close"):
            pub.close()


def test_checkpoint_holds_adapters_and_resumes_exactly(tmp_path):
    eng = lora_engine(tmp_path)
    eng.train_step(*rl_batch(1))
    path = eng.save()
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    model_keys = {k for k in keys if k.startswith("model.")}
    assert model_keys and [k for k in model_keys if ".lora_" not in k] == []  # the frozen base is not saved
    eng.train_step(*rl_batch(2))
    expected = eng.train_step(*rl_batch(3))
    after = {n: p.detach().clone() for n, p in eng.model.named_parameters() if "lora_" in n}

    other = lora_engine(tmp_path)
    other.load()
    other.train_step(*rl_batch(2))
    assert other.train_step(*rl_batch(3)) == pytest.approx(expected, abs=1e-6)
    for n, p in other.model.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p, after[n], atol=1e-6, rtol=1e-6)
