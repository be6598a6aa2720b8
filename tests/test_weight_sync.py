"""Weight sync: after push_weights / update_weights the receiver's logprobs equal the trainer's.

In-process (staged / direct / share, and through the real Generator actor), shared memory
across two OS processes, and torch.distributed broadcast (gloo) across two OS processes.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import uuid

import pytest
import torch

from forge.models.tiny import build_tiny_model
from forge.trainer.engine import TrainEngine
from forge.trainer.packing import pack, sequences_from_rl_batch
from forge.trainer.step import LogprobModel, run_microbatch
from forge.trainer.testing import random_rl_batch
from forge.weight_sync import (
    WeightPublisher,
    WeightSubscriber,
    WeightSyncError,
    clear_registry,
    get_weights,
)

CFG = {"model": {"tiny": "qwen2", "seed": 0}, "loss": {"name": "grpo", "beta": 0.0}, "optimizer": {"lr": 1e-2}}


def logprobs(model, inputs, targets) -> torch.Tensor:
    """A receiver's logprobs on the batch (the same packing path, no grad)."""
    m = LogprobModel(model)
    r = targets[0]["response"].shape[1]
    seqs = sequences_from_rl_batch(inputs[0]["tokens"], r, targets[0]["padding_mask"], inputs[0]["prompt_mask"])
    out = torch.zeros(targets[0]["response"].shape)
    with torch.no_grad():
        for mb in pack(seqs, 4096):
            out[mb.rows] = run_microbatch(m, mb, r)[0]
    return out


def trained_engine(seed: int, steps: int = 2) -> tuple[TrainEngine, tuple]:
    e = TrainEngine(CFG)
    batch = random_rl_batch(batch=4, seed=seed, with_generator=False)
    for _ in range(steps):
        e.train_step(*batch)
    return e, batch


@pytest.fixture
def name():
    n = f"t{uuid.uuid4().hex[:8]}"
    yield n
    clear_registry(n)


def test_inproc_staged_keeps_versions_apart(name):
    e, batch = trained_engine(int(torch.randint(0, 10_000, (1,))))
    gen = build_tiny_model("qwen2", seed=99)  # different weights to start with
    sub = WeightSubscriber(gen, "inproc", name=name)
    pub = WeightPublisher(e.module, "inproc", name=name)
    with pytest.raises(WeightSyncError, match="nothing has been published"):
        sub.fetch()
    pub.publish(1)
    want = e.forward_logprobs(*batch)
    e.train_step(*batch)  # the trainer moves on; version 1 must stay what it was
    assert sub.fetch(1) == 1
    torch.testing.assert_close(logprobs(gen, *batch), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(e.forward_logprobs(*batch), want)
    with pytest.raises(WeightSyncError, match="version 2 requested"):
        sub.fetch(2)
    pub.publish(2)
    assert sub.fetch(2) == 2
    torch.testing.assert_close(logprobs(gen, *batch), e.forward_logprobs(*batch), rtol=1e-5, atol=1e-5)
    # no host round trip: staging lives where the trainer's parameters live
    assert all(t.device == p.device for t, p in zip(get_weights(2, name).values(), e.model.parameters()))


def test_inproc_direct_and_share(name):
    e, batch = trained_engine(int(torch.randint(0, 10_000, (1,))))
    gen = build_tiny_model("qwen2", seed=5).to(torch.bfloat16)  # the generator may run another dtype
    WeightSubscriber(gen, "inproc", name=name)
    WeightPublisher(e.module, "inproc", name=name, mode="direct").publish(3)
    for (n, p), (_, q) in zip(gen.named_parameters(), e.model.named_parameters()):
        assert torch.equal(p, q.to(torch.bfloat16)), n
    with pytest.raises(WeightSyncError, match="share"):
        WeightPublisher(e.module, "inproc", name=name, mode="share").publish(4)  # bf16 vs fp32
    gen32 = build_tiny_model("qwen2", seed=5)
    WeightSubscriber(gen32, "inproc", name=name)
    WeightPublisher(e.module, "inproc", name=name, mode="share").publish(5)
    e.train_step(*batch)
    # shared storage: the generator sees the step at once (why it is opt-in)
    torch.testing.assert_close(logprobs(gen32, *batch), e.forward_logprobs(*batch))


def test_generator_actor_update_weights_matches_trainer():
    name = "policy"  # the Generator fetches through get_weights(version) under the default name
    clear_registry(name)
    gen_mod = pytest.importorskip("forge.actors.generator")
    from forge.actors.trainer import Trainer
    from forge.controller import shutdown

    async def main():
        trainer = await Trainer.as_actor(**CFG, weight_sync={"transport": "inproc", "name": name})
        generator = await gen_mod.Generator.as_service(model=build_tiny_model("qwen2", seed=42))
        inputs, targets = random_rl_batch(batch=3, seed=int(torch.randint(0, 10_000, (1,))), with_generator=False)
        for _ in range(2):
            await trainer.train_step.call(inputs, targets)
        await trainer.push_weights.call(1)
        os.environ["FORGE_WEIGHT_SYNC"] = "inproc"
        try:
            await generator.update_weights.fanout(1)
        finally:
            del os.environ["FORGE_WEIGHT_SYNC"]
        # the generator's own sampling logprobs == the trainer's logprobs of the same tokens
        pm = inputs[0]["prompt_mask"][0].bool()
        prompt = inputs[0]["tokens"][0, :pm.numel()][pm]
        comp = (await generator.generate.route(token_ids=prompt, sampling={"temperature": 1.0, "max_tokens": 6}))[0]
        assert comp.generator_version == 1
        r = comp.token_ids.numel()
        tok = torch.cat([comp.prompt_ids, comp.token_ids])[None]
        batch = ([{"tokens": tok, "prompt_mask": torch.ones(1, tok.shape[1] - r, dtype=torch.long)}],
                 [{"response": comp.token_ids[None], "padding_mask": torch.ones(1, r)}])
        t_lp = (await trainer.forward_logprobs.call(*batch))[0][0]
        torch.testing.assert_close(comp.logprobs, t_lp, rtol=1e-4, atol=1e-4)
        await shutdown()
        clear_registry(name)

    asyncio.run(main())


# ----------------------------------------------------------------------------- cross-process


def _shm_trainer(name: str, directory: str, seed: int, out: str) -> None:
    torch.set_num_threads(1)
    e, batch = trained_engine(seed)
    WeightPublisher(e.module, "shm", name=name, directory=directory).publish(7)
    torch.save(e.forward_logprobs(*batch), out)


def test_shm_across_processes(tmp_path):
    name, seed = f"t{uuid.uuid4().hex[:8]}", int(torch.randint(0, 10_000, (1,)))
    out = str(tmp_path / "lp.pt")
    p = mp.get_context("spawn").Process(target=_shm_trainer, args=(name, str(tmp_path), seed, out))
    p.start()
    p.join(120)
    assert p.exitcode == 0
    gen = build_tiny_model("qwen2", seed=123)
    sub = WeightSubscriber(gen, "shm", name=name, directory=str(tmp_path))
    assert sub.available_version() == 7
    with pytest.raises(WeightSyncError, match="version 8 is not available"):
        sub.fetch(8)
    assert sub.fetch(7) == 7
    batch = random_rl_batch(batch=4, seed=seed, with_generator=False)
    torch.testing.assert_close(logprobs(gen, *batch), torch.load(out), rtol=1e-5, atol=1e-5)
    # and the Generator's get_weights path reads the same file
    w = get_weights(7, name, transport="shm", directory=str(tmp_path))
    assert torch.equal(w["model.embed_tokens.weight"], gen.model.embed_tokens.weight)


def test_shm_versions_are_pruned_and_bad_files_rejected(tmp_path):
    from forge.weight_sync.shm import read_header

    m = build_tiny_model("qwen2", seed=1)
    pub = WeightPublisher(m, "shm", name="p", directory=str(tmp_path), keep=2, dtype=torch.bfloat16)
    for v in (1, 2, 3):
        pub.publish(v)
    assert sorted(f.name for f in tmp_path.glob("forge_ws_p_v*.bin")) == ["forge_ws_p_v2.bin", "forge_ws_p_v3.bin"]
    assert read_header(tmp_path / "forge_ws_p_v3.bin")[0]["version"] == 3
    gen = build_tiny_model("qwen2", seed=2).to(torch.bfloat16)
    assert WeightSubscriber(gen, "shm", name="p", directory=str(tmp_path)).fetch() == 3
    assert torch.equal(gen.lm_head.weight, m.lm_head.weight.to(torch.bfloat16))
    (tmp_path / "forge_ws_p_v2.bin").write_bytes(b"garbage!" * 4)
    with pytest.raises(WeightSyncError, match="bad magic"):
        WeightSubscriber(gen, "shm", name="p", directory=str(tmp_path)).fetch(2)
    other = build_tiny_model("qwen3", seed=0)
    with pytest.raises(WeightSyncError, match="do not fit"):
        WeightSubscriber(other, "shm", name="p", directory=str(tmp_path)).fetch(3)


def test_weight_files_are_private_and_foreign_ones_refused(tmp_path):
    """Weight-sync files live in /dev/shm, writable by every local user: they are created 0600, and a
    file others may write (or another user owns) is refused before it is parsed or unpickled."""
    import os
    import stat

    from forge.weight_sync.cuda_ipc import CudaIpcReader

    m = build_tiny_model("qwen2", seed=1)
    WeightPublisher(m, "shm", name="p", directory=str(tmp_path)).publish(1)
    for f in tmp_path.glob("forge_ws_p*"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    gen = build_tiny_model("qwen2", seed=2)
    sub = WeightSubscriber(gen, "shm", name="p", directory=str(tmp_path))
    os.chmod(tmp_path / "forge_ws_p_v1.bin", 0o666)
    with pytest.raises(WeightSyncError, match="refusing weight-sync file .*forge_ws_p_v1.bin.*writable by group"):
        sub.fetch(1)
    os.chmod(tmp_path / "forge_ws_p_v1.bin", 0o600)
    assert sub.fetch(1) == 1
    if os.getuid() == 0:  # root can hand the file to another user: a foreign owner is refused too
        os.chown(tmp_path / "forge_ws_p_v1.bin", 12345, -1)
        with pytest.raises(WeightSyncError, match="owned by uid 12345"):
            sub.fetch(1)
    # the cuda_ipc descriptor carries pickled handles: refused before anything is unpickled
    desc = tmp_path / "forge_ipc_q.json"
    desc.write_text('{"version": 1, "handles": {}}')
    os.chmod(desc, 0o646)
    with pytest.raises(WeightSyncError, match="refusing weight-sync file"):
        CudaIpcReader("q", tmp_path, device=torch.device("cpu")).weights(1)


def _bcast_trainer(port: int, seed: int, out: str) -> None:
    torch.set_num_threads(1)
    e, batch = trained_engine(seed)
    pub = WeightPublisher(e.module, "broadcast", addr="127.0.0.1", port=port, num_receivers=1,
                          bucket_bytes=64 << 10, timeout_s=60)
    pub.publish(1)
    e.train_step(*batch)
    pub.publish(2)
    torch.save(e.forward_logprobs(*batch), out)
    pub.close()


def test_broadcast_gloo_across_processes(tmp_path, free_port):
    port, seed = free_port(), int(torch.randint(0, 10_000, (1,)))
    out = str(tmp_path / "lp.pt")
    p = mp.get_context("spawn").Process(target=_bcast_trainer, args=(port, seed, out))
    p.start()
    try:
        gen = build_tiny_model("qwen2", seed=77)
        sub = WeightSubscriber(gen, "broadcast", addr="127.0.0.1", port=port, rank=1, num_receivers=1, timeout_s=60)
        assert sub.fetch(2) == 2  # receives publish 1, then 2
        p.join(120)
        assert p.exitcode == 0
        batch = random_rl_batch(batch=4, seed=seed, with_generator=False)
        torch.testing.assert_close(logprobs(gen, *batch), torch.load(out), rtol=1e-5, atol=1e-5)
        sub.close()
    finally:
        if p.is_alive():
            p.kill()


def test_bench_smoke_writes_json(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ws.json"
    r = subprocess.run([sys.executable, str(root / "bench" / "weight_sync.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "inproc staged" in r.stdout and "shm: total" in r.stdout
    res = json.loads(out.read_text())
    assert res["train_step_s"] > 0 and {row["path"] for row in res["rows"]} >= {"inproc direct", "shm: total"}
    assert all(row["seconds"] > 0 for row in res["rows"])


def _publish_and_die(name: str, directory: str) -> None:
    import os
    import signal

    m = build_tiny_model("qwen2", seed=1)
    pub = WeightPublisher(m, "shm", name=name, directory=directory)
    pub.publish(1)
    pub.publish(2)
    os.kill(os.getpid(), signal.SIGKILL)  # a crash: no close(), no finally


def test_stale_files_of_dead_publishers_are_removed_at_start(tmp_path):
    """A killed trainer leaves 2 versions + `.latest` in /dev/shm; the next publisher to start there
    removes them — and only them: a live publisher's files, a reused pid's, another user's are judged
    by the owner recorded inside each file."""
    import json
    import os

    from forge.weight_sync.files import owner

    dead = f"d{uuid.uuid4().hex[:6]}"
    p = mp.get_context("spawn").Process(target=_publish_and_die, args=(dead, str(tmp_path)))
    p.start()
    p.join(120)
    assert p.exitcode == -9
    left = sorted(f.name for f in tmp_path.iterdir())
    assert left == [f"forge_ws_{dead}.latest", f"forge_ws_{dead}_v1.bin", f"forge_ws_{dead}_v2.bin"]
    live = WeightPublisher(build_tiny_model("qwen2", seed=2), "shm", name="live", directory=str(tmp_path))
    live.publish(5)
    # this pid, but another process's start time: the pid was reused, the writer is dead
    reused = tmp_path / "forge_ws_reused.latest"
    me = owner()
    reused.write_text(json.dumps({"version": 1, "file": "x", "owner": {**me, "start": (me["start"] or 0) + 1}}))
    os.chmod(reused, 0o600)
    foreign_host = tmp_path / "forge_ws_other.latest"
    foreign_host.write_text(json.dumps({"version": 1, "owner": {**me, "host": "elsewhere", "pid": 999999999}}))
    os.chmod(foreign_host, 0o600)
    unrelated = tmp_path / "notes_forge_ws.txt"
    unrelated.write_text("not ours")
    WeightPublisher(build_tiny_model("qwen2", seed=3), "shm", name="next", directory=str(tmp_path))
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(
        ["forge_ws_live.latest", "forge_ws_live_v5.bin", foreign_host.name, unrelated.name])
    live.close()  # and a clean end removes the run's own files
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted([foreign_host.name, unrelated.name])
