"""`train_throughput.py --tp N --dp M`: forge's `TrainEngine` on N*M processes (FSDP2 x tensor parallel).

One process per rank (torch.multiprocessing, gloo on CPU / NCCL on GPU, loopback rendezvous), each
a `TrainEngine` with `parallelism: {tensor_parallel_degree: N, data_parallel_shard_degree: M}` on the
benchmark's model shape, timing SFT steps (forward + backward + clip + AdamW) on random full rows.
Tokens/s counts the whole batch (all data-parallel ranks) once.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.multiprocessing as mp

from forge.models import CausalLM, ModelArgs


@dataclass
class ParallelResult:
    tp: int
    dp: int
    precision: str
    tokens_per_s: float
    step_ms: float
    loss: float
    peak_mem_gib: float
    error: str = ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: dict[str, Any], out: Any) -> None:
    from forge.trainer.engine import TrainEngine

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    args: ModelArgs = cfg["args"]
    on_gpu = cfg["device"] == "cuda"
    device = torch.device(f"cuda:{rank}") if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)
    model = CausalLM(args)
    model.init_weights(std=0.02, seed=0)
    tcfg = {"model": {"tiny": args.family}, "optimizer": {"lr": 1e-5},
            "training": {"max_tokens_per_microbatch": cfg["seq"], "dtype": cfg["dtype"], "logprob_chunk_size": cfg["chunk"],
                         "max_norm": 1.0},
            "activation_checkpoint": {"mode": "full" if cfg["ac"] else "none"},
            "parallelism": {"tensor_parallel_degree": cfg["tp"], "data_parallel_shard_degree": cfg["dp"]}}
    engine = TrainEngine(tcfg, device, rank=rank, world_size=world, model=model)  # model= replaces tcfg["model"]
    g = torch.Generator().manual_seed(1)
    batch = {"tokens": torch.randint(0, args.vocab_size, (cfg["batch"], cfg["seq"]), generator=g),
             "loss_mask": torch.ones(cfg["batch"], cfg["seq"], dtype=torch.long)}
    batch["loss_mask"][:, 0] = 0
    times, loss = [], float("nan")
    for i in range(cfg["warmup"] + cfg["steps"]):
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = engine.sft_step(batch)
        if on_gpu:
            torch.cuda.synchronize()
        if i >= cfg["warmup"]:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        step = statistics.median(times)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else 0.0
        out.put(asdict(ParallelResult(cfg["tp"], cfg["dp"], cfg["precision"], cfg["batch"] * cfg["seq"] / step,
                                      step * 1e3, loss, peak)))
    torch.distributed.destroy_process_group()


def run_parallel(args: ModelArgs, tp: int, dp: int, precision: str, a: Any, device: torch.device) -> ParallelResult:
    """Spawn tp*dp ranks and time `a.steps` steps after `a.warmup`. `a.batch` rows are the whole batch."""
    world = tp * dp
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"--tp {tp} --dp {dp} needs {world} GPUs, {torch.cuda.device_count()} visible")
    if a.batch % dp:
        raise ValueError(f"--batch {a.batch} must be a multiple of --dp {dp} (rows are split over data-parallel ranks)")
    dtype = "bfloat16" if precision in ("bf16", "amp") and device.type == "cuda" else "float32"
    cfg = {"args": args, "device": device.type, "seq": a.seq, "batch": a.batch, "steps": a.steps, "warmup": a.warmup,
           "tp": tp, "dp": dp, "ac": a.ac, "chunk": a.chunk_size, "dtype": dtype, "precision": precision}
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, cfg, out)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    codes = [p.exitcode for p in procs]
    if codes != [0] * world:
        raise RuntimeError(f"ranks exited with {codes}")
    return ParallelResult(**out.get())
