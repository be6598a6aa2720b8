"""Chaos bench (issue 26): the GRPO app on the monarch provisioner (2 generator replicas, 2 reward
replicas, the tiny default task, a tiny random model), and per scenario one service's real OS
process is SIGKILLed at a random point mid-step; the run goes on to its end (or to the clear
error its restart policy promises). Per scenario: finished or the error's first line; episodes
generated / trained / lost / duplicated; recovery seconds; the weights version the replacement
starts at vs the trainer's; steps lost. `app` kills the whole app (a subprocess) and reruns it
with --resume, then compares data order and metrics with an uninterrupted run of the same seed.

    PYTHONPATH=src:. python bench/chaos.py                         # every scenario (CPU, ~4 min)
    PYTHONPATH=src:. python bench/chaos.py --short                 # generator + reward, few steps (CI)
    PYTHONPATH=src:. python bench/chaos.py --scenarios trainer,app --out /tmp/chaos.json
    PYTHONPATH=src:. python bench/chaos.py --gpu                   # generator and trainer on one GPU

How episodes are counted (no library change): the bench swaps in a ReplayBuffer subclass (below;
monarch imports it in the buffer's process) that logs the episode ids it receives, evicts as
stale and samples for training to $FORGE_CHAOS_LOG/*.jsonl, and wraps the app-side handles to
log each group before it is added (ids generated) and each prompt drawn. Lost = generated and
neither trained, evicted as stale (off_by_n's rule, not a failure) nor still buffered at the
run's end; a dead buffer's contents count as lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT / "src"), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

from bench import _record  # noqa: E402  (commit, command, device, date in every result file)
from forge.actors.replay_buffer import ReplayBuffer as _ReplayBuffer  # noqa: E402
from forge.controller import endpoint  # noqa: E402

LOG_ENV = "FORGE_CHAOS_LOG"  # directory of the id logs; inherited by the monarch processes
RUN_ENV = "FORGE_CHAOS_RUN"  # which run wrote a line (the app scenario runs the app twice)
SCENARIOS = ("generator", "reward", "reference", "replay_buffer", "trainer", "app")
SHORT = ("generator", "reward")
STATEFUL = {"replay_buffer": "ReplayBuffer", "trainer": "Trainer"}  # restart policy 'fail'
RUN_BOUND_S = 420.0  # every run ends by then: a hang shows as a timeout, never as a stuck bench


def _log(kind: str, **rec: Any) -> None:
    d = os.environ.get(LOG_ENV)
    if not d:
        return
    rec.update(t=time.time(), pid=os.getpid(), run=os.environ.get(RUN_ENV, "0"))
    with open(Path(d) / f"{kind}.jsonl", "a") as f:  # one line per write: a SIGKILL loses at most it
        f.write(json.dumps(rec) + "\n")


def _read(log_dir: Path, kind: str) -> list[dict]:
    f = log_dir / f"{kind}.jsonl"
    if not f.exists():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed writer
            pass
    return out


def _ids(groups: dict[str, list]) -> dict[str, list[str]]:
    return {k: [e.episode_id for e in v] for k, v in groups.items()}


class ReplayBuffer(_ReplayBuffer):
    """The app's buffer, logging ids in its own process (so the log survives its SIGKILL up to the
    last line). Same name: errors name 'ReplayBuffer' as in a normal run."""

    @endpoint
    async def add_group(self, episodes: list) -> None:
        await _ReplayBuffer.add_group(self, episodes)
        _log("added", ids=[e.episode_id for e in episodes], group=str(episodes[0].metadata.get("group_id")))

    @endpoint
    async def evict(self, curr_policy_version: int) -> int:
        before = _ids(self.groups)
        n = await _ReplayBuffer.evict(self, curr_policy_version)
        gone = [k for k in before if k not in self.groups]
        if gone:
            _log("evicted", ids=[i for k in gone for i in before[k]], groups=gone)
        return n

    @endpoint
    async def sample(self, curr_policy_version: int, batch_size: int | None = None) -> Any | None:
        await self.evict(curr_policy_version)  # logged here; the base's own evict then finds nothing
        before, counts = _ids(self.groups), dict(self.sample_counts)
        out = await _ReplayBuffer.sample(self, curr_policy_version, batch_size)
        if out is not None:
            chosen = [k for k in before if k not in self.groups or self.sample_counts.get(k, 0) > counts.get(k, 0)]
            _log("trained", version=curr_policy_version, groups=sorted(chosen),
                 ids=[i for k in chosen for i in before[k][: self.group_size or 1]])
        return out


class _Endpoint:
    def __init__(self, ep: Any, before):
        self._ep, self._before = ep, before

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ep, name)

    async def call_one(self, *a: Any, **k: Any) -> Any:
        out = await self._ep.call_one(*a, **k)
        self._before(a, out)
        return out


class _LoggedDataloader:
    def __init__(self, h: Any):
        self._h = h

    def __getattr__(self, name: str) -> Any:
        ep = getattr(self._h, name)
        if name == "sample":
            return _Endpoint(ep, lambda a, out: out is not None and _log("drawn", sample=out.get("sample_id")))
        return ep


class _LoggedBuffer:
    def __init__(self, h: Any):
        self._h = h

    def __getattr__(self, name: str) -> Any:
        ep = getattr(self._h, name)
        if name != "add_group":
            return ep
        outer = self

        class Add:
            async def call_one(self, group: list) -> Any:  # logged before: a dead buffer loses it
                _log("generated", ids=[e.episode_id for e in group], group=str(group[0].metadata.get("group_id")))
                return await outer._h.add_group.call_one(group)
        return Add()


def install_recording() -> None:
    """Swap in the logging buffer and wrap the app-side handles (this process only; the buffer
    class travels to its monarch process by import path)."""
    import apps.grpo.main as app
    import apps.grpo.support as support

    support.ReplayBuffer = ReplayBuffer
    if getattr(app.build_services, "_chaos", False):
        return
    orig = app.build_services

    async def build_services(*a: Any, **k: Any):
        s = await orig(*a, **k)
        s.dataloader = _LoggedDataloader(s.dataloader)
        s.replay_buffer = _LoggedBuffer(s.replay_buffer)
        return s

    build_services._chaos = True  # type: ignore[attr-defined]
    app.build_services = build_services


# ------------------------------------------------------------------------------- configuration
def app_argv(model: str, run_dir: Path, steps: int, scenario: str, gpu: bool) -> list[str]:
    argv = ["--model", model, "--output_dir", str(run_dir), "--provisioner", "monarch", "--steps", str(steps),
            "--services.policy.num_replicas", "2", "--services.reward_actor.num_replicas", "2",
            "--eval.num_samples", "0", "--eval.every", "0", "--local_batch_size", "16", "--group_size", "8",
            "--samples_every", "0", "--checkpoint_interval", "2", "--advantage.filter_zero_variance", "false",
            "--seed", "7"]
    if scenario == "reference":
        argv += ["--loss.beta", "0.05"]  # a KL term: the reference model exists
    if scenario == "app":  # the settings under which two runs of one seed are identical (README)
        argv += ["--off_by_n", "0", "--rollout_threads", "1"]
    if gpu:
        argv += ["--services.policy.with_gpus", "true", "--actors.trainer.with_gpus", "true"]
    return argv


def load_cfg(argv: list[str], gpu: bool, varied_reward: bool = False):
    from apps.grpo.config import load_grpo_config
    from apps.grpo.main import DEFAULT_CONFIG
    from forge.config import compose, parse_cli, to_container

    cfg, _ = load_grpo_config(to_container(compose(parse_cli(argv), DEFAULT_CONFIG)))
    if varied_reward:  # the random model scores 0 on math: equal losses would prove nothing
        cfg.rewards = [{"name": "length", "max_length": 12, "buffer": 12}]
    if gpu:  # one GPU shared by the generator and the trainer
        cfg.provisioner = {"kind": "monarch", "share_gpus": True}
    return cfg


# ------------------------------------------------------------------------------- results
@dataclass
class Row:
    scenario: str
    expected: str  # "finish" or "error naming <service> and the last checkpoint"
    outcome: str = ""  # "finished" | "error" | "timeout"
    as_expected: bool = False
    error: str | None = None  # first line
    steps_requested: int = 0
    steps_done: int = 0
    steps_lost: int = 0  # finished: requested - done; stopped: done - last checkpoint step (to redo)
    killed_pid: int | None = None
    kill_step: int | None = None
    kill_delay_s: float | None = None
    recovery_s: float | None = None
    replacement_version: int | None = None
    trainer_version: int | None = None
    episodes_generated: int = 0
    episodes_trained: int = 0
    episodes_evicted_stale: int = 0
    episodes_left_in_buffer: int = 0
    episodes_lost: int = 0
    episodes_duplicated: int = 0
    prompts_drawn: int = 0
    prompts_without_group: int = 0  # drawn, no group generated (includes the ones in flight at the end)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def account(row: Row, log_dir: Path, buffer_alive: bool, run: str | None = None) -> None:
    def sel(kind: str) -> list[dict]:
        return [r for r in _read(log_dir, kind) if run is None or r["run"] == run]

    gen = [i for r in sel("generated") for i in r["ids"]]
    added = [i for r in sel("added") for i in r["ids"]]
    trained = [i for r in sel("trained") for i in r["ids"]]
    evicted = {i for r in sel("evicted") for i in r["ids"]}
    trained_set = set(trained)
    left = (set(added) - trained_set - evicted) if buffer_alive else set()
    row.episodes_generated = len(set(gen))
    row.episodes_trained = len(trained_set)
    row.episodes_evicted_stale = len(evicted)
    row.episodes_left_in_buffer = len(left)
    row.episodes_lost = len(set(gen) - trained_set - evicted - left)
    train_groups = [g for r in sel("trained") for g in r["groups"]]
    # the same episode twice, or the same prompt's group trained in two steps (regenerated)
    row.episodes_duplicated = max(len(trained) - len(trained_set), 8 * (len(train_groups) - len(set(train_groups))))
    drawn = [r["sample"] for r in sel("drawn")]
    row.prompts_drawn = len(drawn)
    row.prompts_without_group = len(set(drawn) - {r["group"] for r in sel("generated")})


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


# ------------------------------------------------------------------------------- in-process scenarios
def _handle(s: Any, scenario: str) -> tuple[Any, int]:
    """(service, replica id) whose process is killed."""
    return {
        "generator": (s.policy, 1),
        "reward": (s.reward_actor, 1),
        "reference": (s.ref_model, 0),
        "replay_buffer": (s.replay_buffer._h, 0),
        "trainer": (s.trainer, 0),
    }[scenario]


async def _recovered(scenario: str, handle: Any, rid: int, killed_at: float, row: Row, state: dict) -> None:
    """kill -> the first successful call that reached the replacement."""
    svc = handle._service
    rep = svc.replicas[rid]
    while True:
        if rep.restarts >= 1 and rep.healthy and not svc._restarting:
            if scenario == "generator":  # fanout skips replicas still catching up on weights
                versions = await handle.get_version.fanout()
                if len(versions) == len(svc.replicas):
                    row.recovery_s = time.time() - killed_at
                    row.replacement_version, row.trainer_version = versions[rid], state["step"]
                    return
            elif scenario == "reward":
                names = await handle.reward_names.fanout()
                if len(names) == len(svc.replicas):
                    row.recovery_s = time.time() - killed_at
                    return
            else:  # the reference model (one replica): every forward now goes to the replacement
                row.recovery_s = time.time() - killed_at
                return
        await asyncio.sleep(0.05)


async def run_in_process(scenario: str, model: str, work: Path, steps: int, kill_step: int, gpu: bool,
                         rng: random.Random) -> Row:
    from apps.grpo.main import main
    from forge.controller.monarch import pid_alive

    stateful = STATEFUL.get(scenario)
    row = Row(scenario, f"error naming {stateful} and the last checkpoint" if stateful else "finish",
              steps_requested=steps, kill_step=kill_step)
    log_dir = work / "log"
    log_dir.mkdir(parents=True)
    os.environ[LOG_ENV], os.environ[RUN_ENV] = str(log_dir), "0"
    cfg = load_cfg(app_argv(model, work / "run", steps, scenario, gpu), gpu)
    state: dict[str, Any] = {"step": 0, "t": [], "watch": None, "killed_at": None}
    loop_t0 = time.time()

    def kill(pid: int) -> None:
        state["killed_at"] = time.time()
        os.kill(pid, signal.SIGKILL)

    async def on_step(step: int, s: Any) -> None:
        state["step"] = step
        state["t"].append(time.time())
        if step == kill_step:
            handle, rid = _handle(s, scenario)
            pid = handle._service.replicas[rid].pids[0]
            gaps = [b - a for a, b in zip(state["t"], state["t"][1:])] or [1.0]
            row.killed_pid, row.kill_delay_s = pid, rng.uniform(0.0, min(gaps))  # within the next step
            asyncio.get_running_loop().call_later(row.kill_delay_s, kill, pid)
            if not stateful:
                async def watch() -> None:
                    while state["killed_at"] is None:
                        await asyncio.sleep(0.01)
                    await _recovered(scenario, handle, rid, state["killed_at"], row, state)
                state["watch"] = asyncio.ensure_future(watch())
        if step == steps and state["watch"] is not None:  # the run may end before the replacement is up
            await asyncio.wait_for(state["watch"], 180)

    t0 = time.time()
    try:
        out = await asyncio.wait_for(main(cfg, on_step=on_step), RUN_BOUND_S)
        row.outcome, row.steps_done = "finished", out["steps"]
        row.steps_lost = steps - out["steps"]
    except TimeoutError:
        row.outcome, row.error = "timeout", f"no end within {RUN_BOUND_S:.0f}s (a hang)"
    except Exception as e:  # noqa: BLE001 - the outcome is what the bench reports
        row.outcome, row.error = "error", first_line(e)
        row.steps_done = state["step"]
        from forge.trainer.checkpoint import latest_checkpoint
        last = latest_checkpoint(work / "run" / "checkpoints")
        row.steps_lost = state["step"] - (int(last.name.split("_")[-1]) if last else 0)
        row.extra["error_full"] = str(e)[:2000]
    finally:
        if state["watch"] is not None and not state["watch"].done():
            state["watch"].cancel()
        if row.killed_pid and pid_alive(row.killed_pid):
            os.kill(row.killed_pid, signal.SIGKILL)
    row.seconds = time.time() - t0
    row.extra["run_s_before_kill"] = (state["killed_at"] or time.time()) - loop_t0
    if stateful:
        msg = row.extra.get("error_full", "")
        row.as_expected = (row.outcome == "error" and f"{stateful}[replica 0] is lost" in msg
                           and ("checkpoint" in msg))
    else:
        row.as_expected = row.outcome == "finished" and row.steps_done == steps
    account(row, log_dir, buffer_alive=scenario != "replay_buffer")
    return row


# ------------------------------------------------------------------------------- the whole app
def _child(spec: dict) -> None:
    """A whole GRPO app in this process (the `app` scenario's subprocess)."""
    from apps.grpo.main import main

    install_recording()
    cfg = load_cfg(spec["argv"], spec["gpu"], varied_reward=True)
    asyncio.run(main(cfg, resume=spec["resume"]))


def _spawn(spec: dict, log_dir: Path, run: str) -> subprocess.Popen:
    env = {**os.environ, LOG_ENV: str(log_dir), RUN_ENV: run,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(spec)],
                            env=env, cwd=ROOT, start_new_session=True,  # its monarch processes: one group
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _trained_rows(run_dir: Path) -> dict[int, dict]:
    f = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []
    return {r["step"]: r for r in rows if "rl_trainer/avg_loss" in r}


def _finish(p: subprocess.Popen, bound: float) -> tuple[int | None, str]:
    try:
        out, _ = p.communicate(timeout=bound)
        return p.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return None, out


def _group_alive(pgid: int) -> list[int]:
    alive = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                st = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(st[2]) == pgid and st[0] not in ("Z", "X"):
                alive.append(int(d.name))
    return alive


def run_app(model: str, work: Path, steps: int, kill_step: int, gpu: bool, rng: random.Random) -> Row:
    from forge.trainer.checkpoint import latest_checkpoint

    row = Row("app", "resume finishes; data order and metrics equal an uninterrupted run's",
              steps_requested=steps, kill_step=kill_step)
    log_dir = work / "log"
    log_dir.mkdir(parents=True)
    run_dir, ref_dir = work / "run", work / "uninterrupted"
    spec = {"argv": app_argv(model, run_dir, steps, "app", gpu), "gpu": gpu, "resume": False}
    t0 = time.time()
    p = _spawn(spec, log_dir, "1")
    deadline = time.time() + RUN_BOUND_S
    seen: dict[int, float] = {}
    while p.poll() is None and time.time() < deadline:  # watch its metrics for the kill step
        for st in _trained_rows(run_dir):
            seen.setdefault(st, time.time())
        if kill_step in seen:
            break
        time.sleep(0.05)
    if kill_step not in seen:
        rc, out = _finish(p, 1)
        row.outcome, row.error = "error", f"the first run ended (rc {rc}) before step {kill_step}: {out[-300:]}"
        return row
    gaps = [seen[s] - seen[s - 1] for s in seen if s - 1 in seen] or [1.0]
    row.kill_delay_s = rng.uniform(0.0, min(gaps))
    time.sleep(row.kill_delay_s)
    row.killed_pid = p.pid
    os.kill(p.pid, signal.SIGKILL)
    killed_at = time.time()
    p.communicate()
    done_before = max(_trained_rows(run_dir))
    time.sleep(3.0)
    orphans = _group_alive(p.pid)  # what a crashed controller leaves running
    row.extra["orphan_processes_3s_after_kill"] = len(orphans)
    for pid in orphans:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    last = latest_checkpoint(run_dir / "checkpoints")
    ckpt_step = int(last.name.split("_")[-1]) if last else 0
    row.steps_lost = done_before - ckpt_step  # redone after the resume
    row.extra.update(steps_done_before_kill=done_before, checkpoint_step=ckpt_step)

    p = _spawn({**spec, "resume": True}, log_dir, "2")
    rc, out = _finish(p, RUN_BOUND_S)
    resume_s = time.time() - killed_at
    if rc != 0:
        row.outcome = "timeout" if rc is None else "error"
        row.error = (out.strip().splitlines() or ["(no output)"])[-1]
        row.seconds = time.time() - t0
        return row
    row.outcome, row.steps_done = "finished", max(_trained_rows(run_dir))
    row.recovery_s = resume_s  # kill -> the resumed run's end (the whole app restarts)
    for line in out.splitlines():
        if line.startswith("resumed at step"):
            row.extra["resume_line"] = line

    p = _spawn({**spec, "argv": app_argv(model, ref_dir, steps, "app", gpu)}, log_dir, "ref")
    rc, out = _finish(p, RUN_BOUND_S)
    row.seconds = time.time() - t0
    if rc != 0:
        row.extra["uninterrupted_error"] = out[-500:]
        return row

    # data order: the groups trained at each step; the first run's up to its checkpoint, then the resumed run's
    def per_step(run: str) -> dict[int, list[str]]:
        return {r["version"] + 1: r["groups"] for r in _read(log_dir, "trained") if r["run"] == run}

    first, resumed, ref = per_step("1"), per_step("2"), per_step("ref")
    combined = {**{s: g for s, g in first.items() if s <= ckpt_step}, **resumed}
    keys = ("rl_trainer/avg_loss", "rl_trainer/grad_norm", "reward/total/mean", "rollout/response_len/mean")
    a, b = _trained_rows(run_dir), _trained_rows(ref_dir)
    metrics_equal = sorted(a) == sorted(b) and all([a[s].get(k) for k in keys] == [b[s].get(k) for k in keys] for s in a)
    row.extra.update(data_order_equal=combined == ref, metrics_equal=metrics_equal,
                     compared_metrics=list(keys),
                     data_order_diff={s: [combined.get(s), ref.get(s)] for s in sorted(set(combined) | set(ref))
                                      if combined.get(s) != ref.get(s)})
    all_groups = [g for s in sorted(combined) for g in combined[s]]
    ref_groups = [g for s in sorted(ref) for g in ref[s]]
    # episodes by group (8 each): episode ids are new uuids in the resumed run
    row.episodes_trained = 8 * len(set(all_groups))
    row.episodes_generated = 8 * len({r["group"] for r in _read(log_dir, "generated") if r["run"] in ("1", "2")})
    row.episodes_lost = 8 * len(set(ref_groups) - set(all_groups))
    row.episodes_duplicated = 8 * (len(all_groups) - len(set(all_groups)))
    row.as_expected = row.steps_done == steps and combined == ref and metrics_equal
    return row


# ------------------------------------------------------------------------------- CLI
COLS = [("scenario", 13), ("outcome", 8), ("ok", 3), ("steps", 6), ("lost", 5), ("gen", 5), ("trained", 7),
        ("ep lost", 7), ("dup", 4), ("recov s", 8), ("ver rep/tr", 10), ("error", 0)]


def table_row(r: Row) -> str:
    ver = f"{r.replacement_version}/{r.trainer_version}" if r.replacement_version is not None else "-"
    vals = [r.scenario, r.outcome, "yes" if r.as_expected else "NO", f"{r.steps_done}/{r.steps_requested}",
            str(r.steps_lost), str(r.episodes_generated), str(r.episodes_trained), str(r.episodes_lost),
            str(r.episodes_duplicated), f"{r.recovery_s:.1f}" if r.recovery_s is not None else "-", ver,
            (r.error or "")[:120]]
    return " ".join(v.ljust(w) for v, (_, w) in zip(vals, COLS)).rstrip()


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {','.join(SCENARIOS)}")
    p.add_argument("--short", action="store_true", help=f"{','.join(SHORT)} with few steps (CI)")
    p.add_argument("--gpu", action="store_true", help="generator and trainer on cuda (one GPU, shared)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 6; --short 4)")
    p.add_argument("--seed", type=int, default=None, help="the kill points' RNG (default: random)")
    p.add_argument("--model", default=None, help="a checkpoint dir (default: a tiny random Qwen2, written once)")
    p.add_argument("--out", default="bench/results/chaos.json")
    p.add_argument("--work", default=None, help="keep the runs and id logs here (default: a temporary dir)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    names = list(SHORT) if a.short else [x.strip() for x in a.scenarios.split(",") if x.strip()]
    bad = [n for n in names if n not in SCENARIOS]
    if bad:
        p.error(f"--scenarios: unknown {bad}; expected some of {','.join(SCENARIOS)}")
    a.names = names
    a.steps = a.steps or (4 if a.short else 6)
    if a.steps < 4:
        p.error(f"--steps must be >= 4 (a kill at step 2 and a checkpoint before it), got {a.steps}")
    return a


def main(argv: list[str] | None = None) -> list[dict]:
    a = parse(argv)
    if a._child:
        _child(json.loads(a._child))
        return []
    import logging

    logging.basicConfig(level=logging.ERROR)
    seed = a.seed if a.seed is not None else random.randrange(10**6)
    rng = random.Random(seed)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    install_recording()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="forge-chaos-") as tmp:
        work = Path(a.work or tmp)
        model = a.model
        if model is None:
            from forge.models.tiny import write_tiny_checkpoint
            model = str(write_tiny_checkpoint(work / "tiny", "qwen2", seed=0))
        print(" ".join(n.ljust(w) for n, w in COLS).rstrip(), flush=True)
        for name in a.names:
            kill_step = 2 if name != "app" else 3  # after the checkpoint of step 2 (interval 2)
            if name == "app":
                row = run_app(model, work / name, a.steps, kill_step, a.gpu, rng)
            else:
                row = asyncio.run(run_in_process(name, model, work / name, a.steps, kill_step, a.gpu, rng))
            rows.append(row)
            print(table_row(row), flush=True)
    result = {"seed": seed, "steps": a.steps, "gpu": a.gpu, "scenarios": [asdict(r) for r in rows]}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _record.write_json(out, result)
    print(f"wrote {out}")
    return result["scenarios"]


if __name__ == "__main__":
    # run as the module bench.chaos, not __main__: the ReplayBuffer subclass must be importable
    # by name in the buffer's monarch process
    import bench.chaos

    bench.chaos.main()
