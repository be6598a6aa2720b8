"""Starting hosts for multi-host runs, on Monarch's own job API.

    forge worker --address tcp://0.0.0.0:26600      # one attachable host (job: attach), on any launcher
    forge launch slurm --config apps/grpo/qwen3_32b.yaml --nodes 4 [--dry-run] [overrides ...]

`forge worker` runs Monarch's `run_worker_loop_forever` at the address: a controller with
`provisioner: {kind: monarch, job: attach, workers: [tcp://HOST:26600, ...]}` places its
services there. `forge launch slurm` writes the sbatch script through `monarch.job.SlurmJob`
(batch mode: one allocation of N nodes runs a worker on each node and `forge grpo` with
`provisioner.job: slurm` on the first, which attaches to them) and submits it; `--dry-run`
prints the script and submits nothing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile


def worker_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="forge worker", description="Run one Monarch worker host (job: attach).")
    parser.add_argument("--address", required=True, help="tcp://HOST:PORT this worker listens on")
    args = parser.parse_args(argv)
    from forge.controller.hosts import worker_command

    cmd = worker_command(args.address, sys.executable)
    os.execv(cmd[0], cmd)  # the worker loop replaces this process: its pid is the host's


def launch_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="forge launch", description="Submit a multi-host forge run.")
    parser.add_argument("scheduler", choices=["slurm"])
    parser.add_argument("--nodes", type=int, required=True, help="nodes of the allocation")
    parser.add_argument("--app", default="grpo", choices=["grpo"], help="the app the allocation runs")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    args, rest = parser.parse_known_args(argv)
    script = slurm_script_for(args.nodes, rest, args.app, dry_run=args.dry_run)
    if args.dry_run:
        sys.stdout.write(script)
    return 0


def slurm_script_for(nodes: int, app_argv: list[str], app: str = "grpo", dry_run: bool = True,
                     config_out: str | None = None) -> str:
    """The app's config (with `app_argv` overrides) on a SLURM job of `nodes` nodes: the sbatch
    script (dry run: nothing written or submitted), or write the resolved config to `config_out`
    (default forge_<job_name>.yaml here), submit, and return the script submitted. The client in
    the allocation runs `forge <app> --config <that file>`."""
    import yaml

    from apps.grpo.config import load_grpo_config, provisioner_section
    from apps.grpo.main import DEFAULT_CONFIG
    from forge.config import ConfigError, compose, parse_cli, to_container
    from forge.controller.hosts import JobConfig, sbatch_script, submit_slurm

    if nodes < 1:
        raise ConfigError(f"--nodes must be >= 1, got {nodes}")
    data = to_container(compose(parse_cli(app_argv), DEFAULT_CONFIG))
    prov = data.get("provisioner") or {}
    prov = {"kind": prov} if isinstance(prov, str) else dict(prov)
    if prov.get("launcher") not in (None, "local", "slurm"):
        raise ConfigError(f"provisioner.launcher: {prov['launcher']!r}: `forge launch slurm` runs the job on slurm")
    if prov.get("job") not in (None, "slurm"):
        raise ConfigError(f"provisioner.job: {prov['job']!r}: `forge launch slurm` runs the job on slurm")
    prov.pop("launcher", None)
    prov.update(kind="monarch", job="slurm", hosts=nodes)
    data["provisioner"] = prov
    cfg, _ = load_grpo_config(dict(data))  # every key checked before anything is submitted
    from apps.grpo.support import weight_sync_config

    weight_sync_config(cfg)  # the generators on other nodes must know where the trainer is (addr)
    section = provisioner_section(cfg)
    job = JobConfig(**{f: getattr(section, f) for f in JobConfig.__dataclass_fields__})
    path = os.path.abspath(config_out or f"forge_{job.job_name}.yaml")
    client = shlex.join(["forge", app, "--config", path])
    if dry_run:
        with tempfile.TemporaryDirectory() as tmp:
            return sbatch_script(job, tmp, client_script=client)
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    submit_slurm(job, client)
    return client
