"""2-rank FSDP2 (gloo, two CPU processes) == 1 rank: losses, grad norms, weights, logprobs,
HF export and a DCP checkpoint written by 2 ranks and resumed by 1."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

from forge.trainer.engine import TrainEngine
from forge.trainer.testing import random_rl_batch

CFG = {"model": {"tiny": "qwen2", "seed": 0}, "loss": {"name": "grpo", "beta": 0.0, "agg": "seq-mean-token-mean"},
       "optimizer": {"lr": 1e-3}, "training": {"max_tokens_per_microbatch": 24}}
STEPS = 3


def _worker(rank: int, port: int, seed: int, out: str) -> None:
    # what the monarch backend sets for each proc of a replica
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = dict(CFG, checkpoint={"dir": os.path.join(out, "ck")})
    e = TrainEngine(cfg, "cpu", rank=rank, world_size=2)
    assert e.distributed
    batch = random_rl_batch(batch=5, seed=seed, with_generator=True)
    losses, norms = [], []
    for _ in range(STEPS):
        losses.append(e.train_step(*batch))
        norms.append(e.last_grad_norm)
    lp = e.forward_logprobs(*batch)
    full = {n: p.full_tensor() for n, p in e.model.named_parameters()}
    e.export_hf(os.path.join(out, "hf"))
    e.save()
    if rank == 0:
        torch.save({"losses": losses, "norms": norms, "lp": lp, "params": full}, os.path.join(out, "r.pt"))
    import torch.distributed as dist

    dist.destroy_process_group()


def test_fsdp_two_ranks_equal_one_rank(tmp_path, free_port):
    seed, port = int(torch.randint(0, 10_000, (1,))), free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, port, seed, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    got = torch.load(tmp_path / "r.pt")

    e = TrainEngine(CFG)
    batch = random_rl_batch(batch=5, seed=seed, with_generator=True)
    losses, norms = [], []
    for _ in range(STEPS):
        losses.append(e.train_step(*batch))
        norms.append(e.last_grad_norm)
    assert got["losses"] == pytest.approx(losses, abs=1e-5)
    assert got["norms"] == pytest.approx(norms, rel=1e-4)
    torch.testing.assert_close(got["lp"], e.forward_logprobs(*batch), rtol=1e-4, atol=1e-4)
    for n, p in e.model.named_parameters():
        if n.endswith("k_proj.bias"):  # zero true gradient (softmax shift invariance): Adam amplifies noise
            continue
        torch.testing.assert_close(got["params"][n], p.detach(), rtol=1e-3, atol=1e-4, msg=n)

    from forge.models.hf_io import load_model

    exported = load_model(tmp_path / "hf")
    for n, p in exported.named_parameters():
        assert torch.equal(p, got["params"][n]), n

    # a checkpoint written by 2 ranks resumes on 1 (DCP reshards) with the same next loss
    r = TrainEngine(dict(CFG, checkpoint={"dir": str(tmp_path / "ck")}))
    assert r.load()["step"] == STEPS
    nxt = e.train_step(*batch)
    assert r.train_step(*batch) == pytest.approx(nxt, abs=1e-4)


def test_monarch_two_proc_trainer_equals_one_rank_and_pushes_over_shm(tmp_path):
    """The real path: a 2-proc Trainer replica under the monarch backend (FSDP2 over gloo from
    the env monarch sets), weights pushed over shared memory to this process."""
    pytest.importorskip("monarch")
    import asyncio
    import uuid

    from forge.actors.trainer import Trainer
    from forge.controller import init_provisioner, shutdown
    from forge.models.tiny import build_tiny_model
    from forge.weight_sync import WeightSubscriber

    seed, name = int(torch.randint(0, 10_000, (1,))), f"m{uuid.uuid4().hex[:8]}"
    batch = random_rl_batch(batch=5, seed=seed)
    ref = TrainEngine(CFG)
    want = [ref.train_step(*batch) for _ in range(2)]

    async def main():
        init_provisioner("monarch")
        try:
            tr = await Trainer.options(procs=2).as_actor(
                **CFG, weight_sync={"transport": "shm", "name": name, "directory": str(tmp_path)})
            got = [await tr.train_step.call(*batch) for _ in range(2)]
            for per_rank, w in zip(got, want):
                assert per_rank[0] == per_rank[1] == pytest.approx(w, abs=1e-5)  # not summed over ranks
            await tr.push_weights.call(2)
            lp = await tr.forward_logprobs.call(*batch)
            # fetch before shutdown: the trainer's teardown removes its /dev/shm files
            assert WeightSubscriber(gen, "shm", name=name, directory=str(tmp_path)).fetch(2) == 2
        finally:
            await shutdown()
        assert not list(tmp_path.glob("forge_ws_*"))  # no shared memory leaked
        return lp

    gen = build_tiny_model("qwen2", seed=31)
    lp = asyncio.run(main())
    probe = TrainEngine(CFG, model=gen)
    torch.testing.assert_close(probe.forward_logprobs(*batch), lp[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.forward_logprobs(*batch), lp[0], rtol=1e-4, atol=1e-4)
