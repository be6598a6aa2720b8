"""apps/grpo/main.py when services die or the run crashes (issue 29 items 6 and 8): stateful
services come back with their state or the run stops naming the loss and the checkpoint; a
crashed run leaves no weight files behind."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from apps.grpo.main import main
from forge.controller import ReplicaLostError
from tests.test_grpo_app import config  # tiny_model: the conftest fixture

FAST = ["--eval.num_samples", "8", "--eval.every", "0", "--local_batch_size", "16",
        "--advantage.filter_zero_variance", "false"]


def test_killed_trainer_stops_the_run_naming_the_last_checkpoint(tiny_model, tmp_path):
    run = tmp_path / "run"

    async def kill_trainer(step: int, s) -> None:
        if step == 3:
            await s.trainer.kill_replica()

    cfg = config("--model", tiny_model, "--output_dir", str(run), "--steps", "6", "--checkpoint_interval", "2", *FAST)
    with pytest.raises(ReplicaLostError) as info:
        asyncio.run(main(cfg, on_step=kill_trainer))
    msg = str(info.value)
    assert "Trainer[replica 0] is lost" in msg and "restart policy is 'fail'" in msg, msg
    assert str(run / "checkpoints" / "step_2") in msg and "--resume" in msg, msg
    assert not (run / "summary.json").exists()  # it did not go on training a reset model


def test_killed_generator_comes_back_at_the_current_version(tiny_model, tmp_path):
    seen: list[int] = []

    async def kill_generator(step: int, s) -> None:
        if step != 2:
            return
        svc = s.policy._service
        await s.policy.kill_replica(0)
        deadline = time.monotonic() + 60
        while not (svc.replicas[0].healthy and svc.replicas[0].restarts == 1 and not svc._restarting):
            assert time.monotonic() < deadline, "the generator never came back"
            await asyncio.sleep(0.02)
        seen.extend(await s.policy.get_version.fanout())  # before the next weight sync

    cfg = config("--model", tiny_model, "--output_dir", str(tmp_path / "run"), "--steps", "4", *FAST)
    out = asyncio.run(main(cfg, on_step=kill_generator))
    assert out["steps"] == 4
    assert seen == [2]  # the weights of step 2, not the constructor's version 0


def test_crashed_run_leaves_no_weight_files(tiny_model, tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    files: list[str] = []

    async def crash(step: int, s) -> None:
        files.extend(p.name for p in shm.iterdir())
        if step == 2:
            raise RuntimeError("boom")

    cfg = config("--model", tiny_model, "--output_dir", str(tmp_path / "run"), "--steps", "4", *FAST,
                 "--trainer.weight_sync.transport", "shm", "--trainer.weight_sync.directory", str(shm))
    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(main(cfg, on_step=crash))
    assert any(f.endswith(".latest") for f in files)  # the run did publish there
    assert list(shm.iterdir()) == []


def test_resume_after_a_crash_redoes_steps_without_duplicate_rows(tiny_model, tmp_path, monkeypatch, capsys):
    """Item 7: the checkpoint holds the replay buffer; rows of steps redone after a resume are not
    duplicated in metrics.jsonl / samples.jsonl; the learning curve covers the whole run."""
    import json

    import torch

    import apps.grpo.main as app

    run = tmp_path / "run"
    common = ["--model", tiny_model, "--output_dir", str(run), "--checkpoint_interval", "2", "--samples_every", "1",
              *FAST]

    async def crash(step: int, s) -> None:
        if step == 3:
            raise RuntimeError("crash after step 3")

    with pytest.raises(RuntimeError, match="crash after step 3"):
        asyncio.run(main(config(*common, "--steps", "4"), on_step=crash))
    state = torch.load(run / "checkpoints" / "step_2" / "trainer_state.pt", weights_only=True)
    n_groups = len(state["extra"]["extra"]["replay_buffer"]["groups"])  # run-ahead groups (off_by_n 1)
    curves: list[list[dict]] = []
    monkeypatch.setattr(app, "write_learning_curve", lambda history, path: curves.append(list(history)))
    capsys.readouterr()
    out = asyncio.run(main(config(*common, "--steps", "5"), resume=True))
    assert out["steps"] == 5
    if n_groups:  # they are back in the buffer
        assert f"resumed at step 2 with {n_groups} buffered groups" in capsys.readouterr().out
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "rl_trainer/avg_loss" in r] == [1, 2, 3, 4, 5]
    samples = [json.loads(x)["step"] for x in (run / "samples.jsonl").read_text().splitlines()]
    per_step = {st: samples.count(st) for st in set(samples)}
    # samples.jsonl shows the most recently *generated* groups; the first step after a resume (3)
    # may train on restored buffer groups before its rollouts complete, and then writes fewer or none
    assert {1, 2} <= set(per_step) <= {1, 2, 3, 4, 5}, per_step
    full = per_step[1]
    assert all(n == full for st, n in per_step.items() if st != 3) and per_step.get(3, 0) <= full, per_step
    assert samples == sorted(samples), per_step  # no step written twice (a redone step would repeat)
    assert [h["step"] for h in curves[0] if "rl_trainer/avg_loss" in h] == [1, 2, 3, 4, 5]


def test_on_policy_runs_with_one_seed_are_identical(tiny_model, tmp_path):
    """Item 7, the settings README documents as reproducible bit for bit: off_by_n 0 and one
    rollout task (DAPO filter on): two runs with one seed train on the same batches — identical
    losses, gradient norms, rewards and samples. (More rollout tasks: the same samples, but the
    engine batches concurrent groups by timing, so logprobs differ in the last bits; off_by_n >= 1:
    which weights version generates a group is timing.)"""
    import json

    from apps.grpo.config import load_grpo_config
    from forge.config import compose, parse_cli, to_container
    from tests.test_grpo_app import APPS

    keys = ("rl_trainer/avg_loss", "rl_trainer/grad_norm", "reward/total/mean", "rollout/response_len/mean")

    def one(i: int) -> tuple[list, list]:
        run = tmp_path / f"r{i}"
        d = to_container(compose(parse_cli([
            "--model", tiny_model, "--output_dir", str(run), "--steps", "5", "--off_by_n", "0",
            "--rollout_threads", "1", "--advantage.filter_zero_variance", "true", "--samples_every", "1",
            "--eval.num_samples", "4", "--eval.every", "0", "--local_batch_size", "16", "--seed", "7"]),
            APPS / "default.yaml"))
        d["rewards"] = [{"name": "length", "max_length": 12, "buffer": 12}]  # varies within a group
        asyncio.run(main(load_grpo_config(d)[0]))
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        trained = [[r.get(k) for k in keys] for r in rows if "rl_trainer/avg_loss" in r]
        samples = [(x["step"], x["prompt"], x["response"]) for x in
                   map(json.loads, (run / "samples.jsonl").read_text().splitlines())]
        return trained, samples

    (a, sa), (b, sb) = one(0), one(1)
    assert len(a) == 5 and a == b
    assert sa == sb
    assert len({r[0] for r in a}) > 1  # it did train (the losses move)


@pytest.mark.monarch
def test_monarch_killed_processes_restore_or_stop(tiny_model, tmp_path):
    """Real processes (kill -9 through the backend): a killed generator comes back at the current
    weights version (fetched again from /dev/shm), a killed dataset at its position; then a killed
    trainer stops the run naming the last checkpoint, and /dev/shm is clean."""
    pytest.importorskip("monarch")
    shm = tmp_path / "shm"
    shm.mkdir()
    seen: dict[str, object] = {}

    async def chaos(step: int, s) -> None:
        async def back(handle, rid: int = 0) -> None:
            svc = handle._service
            deadline = time.monotonic() + 120
            while not (svc.replicas[rid].healthy and svc.replicas[rid].restarts == 1 and not svc._restarting):
                assert time.monotonic() < deadline, f"{svc.name} never came back"
                await asyncio.sleep(0.05)

        if step == 2:
            pos = await s.dataloader.state_dict.call_one()
            await s.dataloader.kill_replica()
            await s.policy.kill_replica(0)
            await back(s.dataloader)
            await back(s.policy)
            seen["versions"] = await s.policy.get_version.fanout()
            seen["position"] = (pos, await s.dataloader.state_dict.call_one())
        if step == 3:
            await s.trainer.kill_replica()

    cfg = config("--model", tiny_model, "--provisioner", "monarch", "--output_dir", str(tmp_path / "run"),
                 "--steps", "5", "--checkpoint_interval", "2", *FAST,
                 "--trainer.weight_sync.transport", "shm", "--trainer.weight_sync.directory", str(shm))
    with pytest.raises(ReplicaLostError, match=r"Trainer\[replica 0\] is lost.*step_2.*--resume"):
        asyncio.run(main(cfg, on_step=chaos))
    assert seen["versions"] == [2]
    before, after = seen["position"]
    assert after["index"] >= before["index"] and after["epoch"] == before["epoch"]  # not back to the start
    assert list(shm.iterdir()) == []


def test_resumed_on_policy_run_trains_what_an_uninterrupted_one_does(tiny_model, tmp_path, monkeypatch):
    """A crash after a checkpoint, then --resume (off_by_n 0, one rollout task: the reproducible
    settings): the resumed run trains the same batches as an uninterrupted run of the seed. The
    old loop let the rollouts draw the next step's prompt before the checkpoint was saved: that
    prompt was in neither the saved data position nor the saved buffer, and the resume skipped it
    (bench/chaos.py's whole-app scenario found it)."""
    import json

    from apps.grpo.config import load_grpo_config
    from forge.config import compose, parse_cli, to_container
    from tests.test_grpo_app import APPS

    keys = ("rl_trainer/avg_loss", "rl_trainer/grad_norm", "reward/total/mean", "rollout/response_len/mean")
    seed = random.randrange(1000)

    def cfg(run, steps):
        d = to_container(compose(parse_cli([
            "--model", tiny_model, "--output_dir", str(run), "--steps", str(steps), "--off_by_n", "0",
            "--rollout_threads", "1", "--advantage.filter_zero_variance", "false", "--samples_every", "0",
            "--checkpoint_interval", "2", "--eval.num_samples", "0", "--eval.every", "0",
            "--local_batch_size", "16", "--seed", str(seed)]), APPS / "default.yaml"))
        d["rewards"] = [{"name": "length", "max_length": 12, "buffer": 12}]  # varies: losses differ per batch
        return load_grpo_config(d)[0]

    def trained(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [[r["step"], *(r.get(k) for k in keys)] for r in rows if "rl_trainer/avg_loss" in r]

    async def crash(step: int, s) -> None:
        if step == 3:
            raise RuntimeError("crash after step 3")

    import functools

    from forge.actors.dataset import DatasetActor
    from forge.controller import endpoint

    orig = DatasetActor.state_dict

    @endpoint
    @functools.wraps(orig)
    async def slow_state_dict(self, *args, **kwargs):  # as a call to another process takes time: the
        await asyncio.sleep(0.3)  # rollout task runs meanwhile (with monarch processes it does anyway)
        return await orig(self, *args, **kwargs)

    monkeypatch.setattr(DatasetActor, "state_dict", slow_state_dict)
    a, b = tmp_path / "a", tmp_path / "b"
    with pytest.raises(RuntimeError, match="crash after step 3"):
        asyncio.run(main(cfg(a, 5), on_step=crash))
    asyncio.run(main(cfg(a, 5), resume=True))
    asyncio.run(main(cfg(b, 5)))
    assert [r[0] for r in trained(a)] == [1, 2, 3, 4, 5]
    assert trained(a) == trained(b)
