"""Tensor-parallel LLMEngine (forge.engine.tp): TP=2 over two CPU processes (gloo) gives the same
tokens and logprobs as TP=1 and as HF transformers, and a weight update at TP=2 equals a fresh engine
built from the new weights."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

from forge.engine import EngineConfig, LLMEngine, SamplingParams
from forge.engine.tp import check_tp_degree, load_model_shard, shard_of
from forge.models import build_tiny_model, tiny_args, write_tiny_checkpoint

# chunked prefill (64-token budget < the 90-token prompt: rows with cached prefix), n > 1 (forked blocks)
CFG = {"max_num_seqs": 16, "max_model_len": 256, "block_size": 8, "max_num_batched_tokens": 64}
V = tiny_args().vocab_size


def _requests(seed: int) -> list[tuple[list[int], SamplingParams]]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randint(3, V, (n,), generator=g).tolist() for n in (1, 7, 37, 90, 13)]
    sp = [SamplingParams(temperature=0.0, max_tokens=12)] * 3 + [
        SamplingParams(temperature=0.9, max_tokens=12, seed=seed, n=3),
        SamplingParams(temperature=1.2, top_p=0.9, top_k=40, max_tokens=12, seed=seed + 1)]
    return list(zip(ps, sp))


def _results(outs) -> list[tuple[list[int], list[float]]]:
    return [(s.token_ids, s.logprobs) for o in outs for s in o.outputs]


def _worker(rank: int, port: int, family: str, seed: int, out: str) -> None:
    # what the monarch backend sets for each proc of a replica
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    eng = LLMEngine(build_tiny_model(family, seed=seed), EngineConfig(**CFG, tensor_parallel_size=2), eos_token_ids=[])
    assert eng.runner.k_cache.shape[3] == 1  # this rank's KV head of 2
    new = build_tiny_model(family, seed=seed + 1).state_dict()
    # a checkpoint read as this rank's slices only == the shards of the full tensors
    part = load_model_shard(os.path.join(out, "ckpt"), eng.tp)
    got = part.state_dict()
    assert got.keys() == new.keys()
    for name, t in new.items():
        assert torch.equal(got[name], shard_of(name, t, rank, 2)), name
    if rank != 0:
        versions = []
        eng.follow(on_update=lambda v: versions.append((v, eng.load_weights(new))))
        assert versions == [(5, len(new))]
    else:
        before = _results(eng.generate(_requests(seed)))
        eng.load_weights(new, version=5)
        after = _results(eng.generate(_requests(seed)))
        eng.shutdown()
        torch.save({"before": before, "after": after}, os.path.join(out, "r.pt"))
    import torch.distributed as dist

    dist.destroy_process_group()


def _same(got, want, atol: float = 1e-5) -> None:
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, a), (_, b) in zip(got, want):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=atol, rtol=0)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_tp2_equals_tp1_and_hf_and_updates_weights(tmp_path, free_port, family):
    seed, port = int(torch.randint(0, 10_000, (1,))), free_port()
    write_tiny_checkpoint(tmp_path / "ckpt", family, seed=seed + 1)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, port, family, seed, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0, 0]
    got = torch.load(tmp_path / "r.pt")

    torch.set_num_threads(1)
    model = build_tiny_model(family, seed=seed)
    ref = _results(LLMEngine(model, EngineConfig(**CFG), eos_token_ids=[]).generate(_requests(seed)))
    _same(got["before"], ref)
    # HF transformers on the greedy rows
    from test_engine import hf_greedy, hf_twin

    hf = hf_twin(build_tiny_model(family, seed=seed))
    for (p, _), (toks, _) in zip(_requests(seed)[:3], got["before"][:3]):
        assert toks == hf_greedy(hf, p, 12)
    # the update at TP=2 == a fresh TP=1 engine built from the new weights
    fresh = LLMEngine(build_tiny_model(family, seed=seed + 1), EngineConfig(**CFG), eos_token_ids=[])
    _same(got["after"], _results(fresh.generate(_requests(seed))))


def test_degree_must_divide_heads_kv_heads_and_mlp():
    args = tiny_args("llama")  # 4 heads, 2 KV heads, MLP width 176
    check_tp_degree(args, 2)
    with pytest.raises(ValueError, match="tensor_parallel_size=4 must divide.*num_key_value_heads=2"):
        check_tp_degree(args, 4)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 .*num_attention_heads=4, num_key_value_heads=2, "
                                         r"intermediate_size=176"):
        check_tp_degree(args, 3)
    with pytest.raises(ValueError, match="tensor_parallel_size=4 must divide"):
        LLMEngine(build_tiny_model("llama"), EngineConfig(tensor_parallel_size=4))


def test_engine_refuses_a_replica_of_the_wrong_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs a replica of 2 procs.*WORLD_SIZE=1"):
        LLMEngine(build_tiny_model("qwen2"), EngineConfig(tensor_parallel_size=2))


def test_shards_concatenate_to_the_full_tensor():
    sd = build_tiny_model("qwen2", seed=int(torch.randint(0, 1000, (1,)))).state_dict()
    for name, t in sd.items():
        parts = [shard_of(name, t, r, 2) for r in range(2)]
        dim = 1 if name.endswith(("o_proj.weight", "down_proj.weight")) else 0
        if parts[0].shape == t.shape:
            assert "proj" not in name or "lm_head" in name, name
            continue
        assert torch.equal(torch.cat(parts, dim), t), name
        assert parts[0].data_ptr() == t.data_ptr() or dim == 1  # a view: no copy of the full tensor
