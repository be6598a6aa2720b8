"""LoRA under 2-rank FSDP2 (gloo, two CPU processes) == 1 rank: losses, adapters, the published
adapter tensors, the peft adapter file, the merged HF export and a DCP checkpoint resumed by 1 rank."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

from forge.models.lora import AdapterView
from forge.trainer.engine import TrainEngine
from forge.trainer.testing import random_rl_batch
from forge.weight_sync import iter_full_params

CFG = {"model": {"tiny": "qwen2", "seed": 0, "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"}},
       "loss": {"name": "grpo", "beta": 0.0, "agg": "seq-mean-token-mean"},
       "optimizer": {"lr": 1e-2}, "training": {"max_tokens_per_microbatch": 24, "activation_checkpoint": True}}
STEPS = 3


def _worker(rank: int, port: int, seed: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    e = TrainEngine(dict(CFG, checkpoint={"dir": os.path.join(out, "ck")}), "cpu", rank=rank, world_size=2)
    batch = random_rl_batch(batch=5, seed=seed, with_generator=True)
    losses = [e.train_step(*batch) for _ in range(STEPS)]
    published = {n: t.clone() for n, t in iter_full_params(AdapterView(e.model))}
    e.save_adapter(os.path.join(out, "adapter"))
    e.export_hf(os.path.join(out, "hf"))
    e.save()
    if rank == 0:
        torch.save({"losses": losses, "published": published}, os.path.join(out, "r.pt"))
    import torch.distributed as dist

    dist.destroy_process_group()


def test_lora_fsdp_two_ranks_equal_one_rank(tmp_path, free_port):
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
    losses = [e.train_step(*batch) for _ in range(STEPS)]
    assert got["losses"] == pytest.approx(losses, abs=1e-5)
    ours = dict(AdapterView(e.model).named_parameters())
    assert set(ours) == set(got["published"])
    for n, t in ours.items():
        torch.testing.assert_close(got["published"][n], t, rtol=1e-3, atol=1e-5, msg=n)

    from safetensors.torch import load_file

    from forge.models.hf_io import load_model
    from forge.models.lora import merged_state_dict

    e.save_adapter(tmp_path / "adapter1")
    a2, a1 = load_file(tmp_path / "adapter" / "adapter_model.safetensors"), load_file(tmp_path / "adapter1" / "adapter_model.safetensors")
    assert set(a2) == set(a1)
    for k in a1:
        torch.testing.assert_close(a2[k], a1[k], rtol=1e-3, atol=1e-5)
    merged = merged_state_dict(e.model)
    for n, p in load_model(tmp_path / "hf").state_dict().items():
        torch.testing.assert_close(p, merged[n], rtol=1e-3, atol=1e-5, msg=n)

    r = TrainEngine(dict(CFG, checkpoint={"dir": str(tmp_path / "ck")}))  # 2-rank checkpoint, 1 rank resumes
    assert r.load()["step"] == STEPS
    assert r.train_step(*batch) == pytest.approx(e.train_step(*batch), abs=1e-4)
