"""CUDA IPC weight sync between two processes on one GPU (skipped without CUDA), and its CPU
error path (always runs)."""

from __future__ import annotations

import multiprocessing as mp
import time
import uuid

import pytest
import torch

from forge.models.tiny import build_tiny_model
from forge.weight_sync import WeightPublisher, WeightSyncError, get_weights


def test_cuda_ipc_refuses_a_cpu_trainer():
    with pytest.raises(WeightSyncError, match="shm"):
        WeightPublisher(build_tiny_model("qwen2", seed=0), "cuda_ipc", name=f"t-{uuid.uuid4().hex[:6]}")


def _trainer(name: str, seed: int, out: str, done: str) -> None:
    import os

    model = build_tiny_model("qwen2", seed=seed).cuda()
    pub = WeightPublisher(model, "cuda_ipc", name=name, dtype=torch.bfloat16)
    pub.publish(1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    torch.save({n: p.detach().to("cpu", torch.bfloat16) for n, p in model.named_parameters()}, out + ".tmp")
    pub.publish(2)
    os.replace(out + ".tmp", out)
    deadline = time.time() + 120
    while not os.path.exists(done) and time.time() < deadline:  # keep the buffers alive for the reader
        time.sleep(0.05)
    pub.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ipc_across_processes_on_one_gpu(tmp_path):
    name, seed = f"t-{uuid.uuid4().hex[:6]}", int(torch.randint(0, 10_000, (1,)))
    out, done = str(tmp_path / "w.pt"), str(tmp_path / "done")
    p = mp.get_context("spawn").Process(target=_trainer, args=(name, seed, out, done))
    p.start()
    try:
        deadline = time.time() + 120
        import os

        while not os.path.exists(out) and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(WeightSyncError, match="version 1 requested but version 2"):
            get_weights(1, name=name, transport="cuda_ipc", device=torch.device("cuda", 0))
        got = get_weights(2, name=name, transport="cuda_ipc", device=torch.device("cuda", 0))
        want = torch.load(out)
        assert set(got) == set(want)
        for n, t in want.items():
            assert got[n].is_cuda and got[n].dtype == torch.bfloat16
            torch.testing.assert_close(got[n].cpu(), t, rtol=0, atol=0)
        gen = build_tiny_model("qwen2", seed=seed + 1).cuda().to(torch.bfloat16)
        from forge.actors.generator import load_weights_in_place

        assert load_weights_in_place(gen, got) == len(want)
        torch.testing.assert_close(gen.lm_head.weight.cpu() if not gen.args.tie_word_embeddings
                                   else gen.model.embed_tokens.weight.cpu(),
                                   want["lm_head.weight" if not gen.args.tie_word_embeddings
                                        else "model.embed_tokens.weight"], rtol=0, atol=0)
    finally:
        open(done, "w").close()
        p.join(60)
        if p.is_alive():
            p.kill()
    assert p.exitcode == 0
