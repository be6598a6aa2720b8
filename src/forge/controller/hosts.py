"""Hosts for the monarch backend: which Monarch job supplies them, and which replica runs where.

    MonarchProvisioner()                                        # this host only (no job)
    MonarchProvisioner(job="process", hosts=3)                  # 3 local worker processes as hosts
    MonarchProvisioner(job="attach", workers=["tcp://10.0.0.2:26600", ...])   # `forge worker` started them
    MonarchProvisioner(job="slurm", hosts=2, partition="gpu", gpus_per_node=8)
    MonarchProvisioner(job="kubernetes", hosts=2, namespace="ml")

Every job is Monarch's own (`monarch.job`: ProcessJob, SlurmJob, KubernetesJob, or
`attach_to_workers` for workers started by the user's launcher with
`run_worker_loop_forever`); forge adds no launcher and no RPC of its own. The job's hosts form
a `HostPool`: hosts are named groups (`meshes`, default one group `hosts`); a replica of a
service asks for `hosts` hosts (`ActorOptions.hosts`, default 1) from its `mesh_name` group (any
group when unset) and gets the least-loaded live contiguous run of them, so services spread over
the hosts and a replica whose host died restarts on a live one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from forge.controller.errors import ResourceError
from forge.controller.placement import pid_alive

log = logging.getLogger(__name__)

JOB_KINDS = ("process", "attach", "slurm", "kubernetes")
WORKER_CA = "trust_all_connections"  # what Monarch's own jobs use; TLS plumbing is not in Monarch 0.7


@dataclass
class JobConfig:
    """The `provisioner` block's host keys (the monarch provisioner's keyword arguments)."""

    job: str | None = None  # None: this host only; else one of JOB_KINDS
    hosts: int | None = None  # process: worker processes; slurm: nodes; kubernetes: pods
    meshes: dict[str, int] | None = None  # named host groups (Monarch's meshes); default {hosts: <hosts>}
    workers: list[str] = field(default_factory=list)  # attach: tcp://HOST:PORT of each `forge worker`
    # slurm (monarch.job.SlurmJob's arguments)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None  # HH:MM:SS
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    slurm_args: list[str] = field(default_factory=list)  # extra `#SBATCH` lines, e.g. ["--constraint=h100"]
    exclusive: bool = True
    job_name: str = "forge"
    python_exe: str = "python"
    monarch_port: int = 22222
    log_dir: str | None = None
    job_start_timeout: int | None = None
    # kubernetes (monarch.job.KubernetesJob's arguments; pods found by label, as Monarch's attach mode)
    namespace: str | None = None
    label_selector: str | None = None

    def groups(self) -> dict[str, int]:
        if self.job == "attach":
            if self.meshes is not None:
                raise ValueError("provisioner.meshes: job 'attach' takes one list of workers (provisioner.workers), "
                                 "not named meshes")
            if not self.workers:
                raise ValueError("provisioner.workers: job 'attach' needs the worker addresses "
                                 "(tcp://HOST:PORT of each `forge worker --address ...`), got none")
            return {"hosts": len(self.workers)}
        if self.meshes is not None:
            if self.hosts is not None and self.hosts != sum(self.meshes.values()):
                raise ValueError(f"provisioner.hosts: {self.hosts} disagrees with provisioner.meshes {self.meshes} "
                                 f"({sum(self.meshes.values())} hosts); give one of them")
            bad = {k: v for k, v in self.meshes.items() if not isinstance(v, int) or v < 1}
            if bad:
                raise ValueError(f"provisioner.meshes: every group needs >= 1 host, got {bad}")
            return dict(self.meshes)
        if self.hosts is None or self.hosts < 1:
            raise ValueError(f"provisioner.hosts: job {self.job!r} needs the number of hosts (>= 1), got {self.hosts}")
        return {"hosts": self.hosts}

    def validate(self) -> None:
        if self.job is None:
            given = [k for k in ("hosts", "meshes", "partition", "account", "namespace") if getattr(self, k) is not None]
            if given or self.workers:
                raise ValueError(f"provisioner: {given or ['workers']} need a job (provisioner.job: one of "
                                 f"{list(JOB_KINDS)}); without one every replica runs on this host")
            return
        if self.job not in JOB_KINDS:
            raise ValueError(f"provisioner.job must be one of {list(JOB_KINDS)} (or unset: this host), got {self.job!r}")
        self.groups()
        if self.job == "attach":
            for w in self.workers:
                worker_host(w)
        if self.job == "kubernetes" and not self.namespace:
            raise ValueError("provisioner.namespace: job 'kubernetes' needs the namespace of the worker pods")


def worker_host(address: str) -> str:
    """The host name in a worker address `tcp://HOST:PORT` (or `<proc-id>@tcp://HOST:PORT`)."""
    url = address.split("@", 1)[-1]
    parsed = urlparse(url)
    if parsed.scheme not in ("tcp", "metatls", "ipc") or (parsed.scheme != "ipc" and not (parsed.hostname and parsed.port)):
        raise ValueError(f"provisioner.workers: {address!r} is not a worker address (expected tcp://HOST:PORT)")
    return "127.0.0.1" if parsed.scheme == "ipc" else str(parsed.hostname)


def worker_command(address: str, python_exe: str = "python") -> list[str]:
    """The command that starts one attachable worker host (`forge worker --address ...` runs it)."""
    worker_host(address)
    code = (f"from monarch.actor import run_worker_loop_forever; "
            f"run_worker_loop_forever(address={address!r}, ca={WORKER_CA!r})")
    return [python_exe, "-c", code]


@dataclass
class Host:
    index: int  # in the pool
    group: str  # the job's mesh it belongs to
    position: int  # within its group's host mesh
    address: str | None  # what procs on other hosts dial (MASTER_ADDR); None: ask the host's procs
    pid: int | None = None  # the worker's pid when it is a process on this machine (process/attach jobs)
    load: int = 0  # replica processes placed on it
    suspect: bool = False  # a replica died here and the worker's liveness cannot be checked from here
    worker: str | None = None  # attach: the worker's address, to find its pid once it listens (loopback only)

    def find_pid(self) -> None:
        if self.pid is None and self.worker is not None:
            self.pid = _local_listener_pid(self.worker)

    def alive(self) -> bool:
        if self.pid is None:
            return True
        return pid_alive(self.pid)


class HostPool:
    """The job's hosts and who runs on them."""

    def __init__(self, job_kind: str, hosts: list[Host], meshes: dict[str, Any], job: Any = None, owns_job: bool = True):
        self.job_kind, self.hosts, self.meshes, self.job, self.owns_job = job_kind, hosts, meshes, job, owns_job

    def describe(self) -> str:
        groups: dict[str, int] = {}
        for h in self.hosts:
            groups[h.group] = groups.get(h.group, 0) + 1
        live = sum(h.alive() for h in self.hosts)
        return f"job {self.job_kind!r}: {len(self.hosts)} host(s) ({live} live) in groups {groups}"

    def check_fits(self, who: str, hosts: int, group: str | None) -> None:
        """At service start: a placement no group of the job can hold fails with what was asked and what exists."""
        sizes = {g: sum(1 for h in self.hosts if h.group == g) for g in dict.fromkeys(h.group for h in self.hosts)}
        if group is not None and group not in sizes:
            raise ResourceError(f"{who} asks for host mesh '{group}' (mesh_name) but the {self.describe()} has "
                                f"no such group; groups: {sorted(sizes)}")
        cand = {group: sizes[group]} if group is not None else sizes
        if max(cand.values()) < hosts:
            raise ResourceError(f"{who} asks for {hosts} host(s) per replica but the {self.describe()} has at most "
                                f"{max(cand.values())} in " + ("group " + repr(group) if group else "any group"))

    def allocate(self, who: str, hosts: int, procs: int, group: str | None) -> list[Host]:
        """The least-loaded contiguous run of `hosts` live hosts (in one group) for one replica."""
        self.check_fits(who, hosts, group)
        best: tuple[tuple[int, int, int], list[Host]] | None = None
        for h in self.hosts:
            h.find_pid()
        for g in dict.fromkeys(h.group for h in self.hosts):
            if group is not None and g != group:
                continue
            members = sorted((h for h in self.hosts if h.group == g), key=lambda h: h.position)
            for i in range(len(members) - hosts + 1):
                run = members[i:i + hosts]
                if not all(h.alive() for h in run):
                    continue
                key = (sum(h.suspect for h in run), max(h.load for h in run), run[0].index)
                if best is None or key < best[0]:
                    best = (key, run)
        if best is None:
            raise ResourceError(f"{who} needs {hosts} live host(s) in a row but none are left: {self.describe()}")
        for h in best[1]:
            h.load += procs
        return best[1]

    def release(self, hosts: list[Host], procs: int) -> None:
        for h in hosts:
            h.load = max(0, h.load - procs)

    def mesh_for(self, hosts: list[Host]) -> Any:
        """The Monarch host mesh spanning this run of hosts (one group, contiguous)."""
        mesh = self.meshes[hosts[0].group]
        return mesh.slice(hosts=slice(hosts[0].position, hosts[-1].position + 1))

    def shutdown(self) -> None:
        if self.job is not None and self.owns_job:
            try:
                self.job.kill()
            except Exception as e:  # noqa: BLE001 — best effort: the workers of a finished run
                log.debug("killing the %s job failed: %s", self.job_kind, e)


def this_machine() -> str:
    return socket.gethostname()


# ---- Monarch jobs ----------------------------------------------------------------------------


def make_slurm_job(cfg: JobConfig) -> Any:
    """monarch.job.SlurmJob for this config (nothing is submitted until `apply()`)."""
    from monarch.job import SlurmJob

    return SlurmJob(cfg.groups(), python_exe=cfg.python_exe, slurm_args=list(cfg.slurm_args),
                    monarch_port=cfg.monarch_port, job_name=cfg.job_name, time_limit=cfg.time,
                    partition=cfg.partition, log_dir=cfg.log_dir, exclusive=cfg.exclusive,
                    gpus_per_node=cfg.gpus_per_node, cpus_per_task=cfg.cpus_per_task, mem=cfg.mem,
                    job_start_timeout=cfg.job_start_timeout, account=cfg.account, qos=cfg.qos)


def sbatch_script(cfg: JobConfig, workdir: str, client_script: str | None = None) -> str:
    """The sbatch script SlurmJob submits for `cfg` (batch mode with `client_script`: the client
    runs in the allocation), written by SlurmJob itself: its submission runs `sbatch` from PATH,
    here a recorder in `workdir` that keeps the script and submits nothing (`--dry-run`)."""
    record = os.path.join(workdir, "script.sbatch")
    exe = os.path.join(workdir, "sbatch")
    with open(exe, "w") as f:
        f.write(f"#!/bin/sh\ncat > {shlex.quote(record)}\necho 'Submitted batch job 0'\n")
    os.chmod(exe, 0o700)
    scratch_logs = os.path.join(workdir, "logs")  # SlurmJob creates its log directory: not the real one here
    job = make_slurm_job(dataclasses.replace(cfg, log_dir=scratch_logs))
    old_path, old_cwd = os.environ.get("PATH", ""), os.getcwd()
    os.environ["PATH"] = workdir + os.pathsep + old_path
    os.chdir(workdir)  # batch mode writes .monarch/job_state.pkl here, not in the user's directory
    slurm_log = logging.getLogger("monarch._src.job.slurm")
    level, slurm_log.level = slurm_log.level, logging.WARNING  # no "Submitting ..." for a dry run
    try:
        job._create(client_script)  # SlurmJob's own submission: writes the script, pipes it to `sbatch`
    finally:
        os.environ["PATH"] = old_path
        os.chdir(old_cwd)
        slurm_log.setLevel(level)
    with open(record) as f:
        script = f.read().replace(scratch_logs, cfg.log_dir or old_cwd)
    return script if script.endswith("\n") else script + "\n"


def submit_slurm(cfg: JobConfig, client_script: str) -> Any:
    """Submit the job with the controller (`client_script`) running inside the allocation (SlurmJob
    batch mode: the workers start on every node, the client attaches through .monarch/job_state.pkl)."""
    job = make_slurm_job(cfg)
    job.apply(client_script=client_script)
    return job


def start_pool(cfg: JobConfig) -> HostPool:
    """Start (or attach to) the job's hosts."""
    cfg.validate()
    groups = cfg.groups()
    kind = str(cfg.job)
    if kind == "attach":
        from monarch.actor import attach_to_workers

        mesh = attach_to_workers(name="hosts", ca=WORKER_CA, workers=list(cfg.workers))
        hosts = [Host(i, "hosts", i, worker_host(w), worker=w) for i, w in enumerate(cfg.workers)]
        return HostPool(kind, hosts, {"hosts": mesh}, None, owns_job=False)
    if kind == "process":
        from monarch.job import ProcessJob

        job = ProcessJob(groups, env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    elif kind == "slurm":
        job = make_slurm_job(cfg)
    else:
        from monarch._src.job.kubernetes import KubernetesJob

        job = KubernetesJob(namespace=str(cfg.namespace))
        for name, n in groups.items():
            job.add_mesh(name, n, label_selector=cfg.label_selector)
    # inside an allocation `forge launch slurm` submitted, SlurmJob's batch state says where the workers are
    from monarch._src.job._batch_env import in_batch_job

    state = job.state(cached_path=".monarch/job_state.pkl" if kind == "slurm" and in_batch_job() else None)
    meshes = {name: getattr(state, name) for name in groups}
    hosts: list[Host] = []
    for name, n in groups.items():
        for p in range(n):
            pid = address = None
            if kind == "process":  # local worker processes: their pid tells their liveness
                proc = job._host_to_pid[f"{name}_{p}"]
                pid, address = proc.pid, "127.0.0.1"
            hosts.append(Host(len(hosts), name, p, address, pid))
    return HostPool(kind, hosts, meshes, job)


def _local_listener_pid(address: str) -> int | None:
    """The pid of the process listening on a loopback worker address, when it is on this machine
    and visible (a test's or a user's local workers): its death is then seen at once."""
    host = worker_host(address)
    if host not in ("127.0.0.1", "localhost", "::1"):
        return None
    port = urlparse(address.split("@", 1)[-1]).port
    try:
        inodes = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                for line in f.readlines()[1:]:
                    parts = line.split()
                    if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "0A":  # LISTEN
                        inodes.add(parts[9])
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        return int(pid)
            except OSError:
                continue
    except OSError:
        return None
    return None


__all__ = ["JOB_KINDS", "Host", "HostPool", "JobConfig", "make_slurm_job", "sbatch_script", "start_pool", "submit_slurm",
           "worker_command", "worker_host"]
