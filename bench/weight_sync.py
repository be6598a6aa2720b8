"""Weight-sync cost as a fraction of a train step.

    python bench/weight_sync.py --out ws.json            # Qwen2.5-0.5B shape, random weights, GPU if any
    python bench/weight_sync.py --smoke --out ws.json    # tiny model, CPU, seconds

Measures, on one device: a trainer step (8 x 1024 tokens by default), the colocated push
(in-process, staged: trainer -> staging on device -> generator params; and direct), and the
shared-memory transport (trainer writes /dev/shm; a second OS process maps it and copies into
its generator model). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import _record  # noqa: E402  (bench/_record.py: commit, command, device, date in every result file)

from forge.models.args import ModelArgs  # noqa: E402
from forge.models.decoder import CausalLM  # noqa: E402

QWEN25_05B = dict(family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  tie_word_embeddings=True, attention_bias=True, rope_theta=1000000.0, rms_norm_eps=1e-6)


def build(args: ModelArgs, device: torch.device, dtype: torch.dtype, seed: int) -> CausalLM:
    with torch.device("meta"):
        m = CausalLM(args)
    m.to_empty(device=device).to(dtype)
    m.tie_weights()
    from forge.models.hf_io import reset_buffers

    reset_buffers(m)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02, generator=g)
    return m


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _shm_reader(args_dict: dict, device: str, dtype: str, directory: str, name: str, versions: list[int], q, go) -> None:
    from forge.weight_sync import WeightSubscriber

    dev = torch.device(device)
    gen = build(ModelArgs(**args_dict), dev, getattr(torch, dtype), seed=1)
    sub = WeightSubscriber(gen, "shm", name=name, directory=directory)
    q.put("ready")
    times = []
    for v in versions:
        assert go.get(timeout=600) == v  # the trainer published v; publish and fetch never overlap
        t0 = time.perf_counter()
        sub.fetch(v)
        sync(dev)
        times.append(time.perf_counter() - t0)
        q.put("done")
    q.put(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gen-dtype", default="bfloat16")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from forge.trainer.engine import TrainEngine
    from forge.trainer.testing import random_rl_batch
    from forge.weight_sync import WeightPublisher, WeightSubscriber, clear_registry

    if a.smoke:
        margs = ModelArgs(family="qwen2", vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
        device = torch.device("cpu")
        a.batch, a.seq, a.reps = 2, 32, 2
    else:
        margs = ModelArgs(**QWEN25_05B)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen_dtype = getattr(torch, a.gen_dtype) if device.type == "cuda" else torch.float32

    trainer_model = build(margs, device, torch.float32, seed=0)
    engine = TrainEngine({"model": {"tiny": "qwen2"}, "loss": {"name": "grpo", "beta": 0.0},
                          "optimizer": {"lr": 1e-6}, "training": {"max_tokens_per_microbatch": a.batch * a.seq}},
                         device, model=trainer_model)
    p_len = a.seq // 4
    batch = random_rl_batch(batch=a.batch, prompt_len=p_len, response_len=a.seq - p_len, vocab=margs.vocab_size,
                            seed=0, full=True)
    t_step = timeit(lambda: engine.train_step(*batch), device, a.reps)
    n_bytes = sum(p.numel() * p.element_size() for p in trainer_model.parameters())
    rows = []

    def add(name: str, seconds: float) -> None:
        rows.append({"path": name, "seconds": seconds, "fraction_of_step": seconds / t_step,
                     "GB_per_s": n_bytes / seconds / 1e9})

    gen = build(margs, device, gen_dtype, seed=1)
    sub = WeightSubscriber(gen, "inproc", name="bench")
    staged = WeightPublisher(engine.module, "inproc", name="bench")
    v = iter(range(1, 10**6))
    add("inproc staged: publish", timeit(lambda: staged.publish(next(v)), device, a.reps))
    add("inproc staged: fetch", timeit(lambda: sub.fetch(), device, a.reps))
    add("inproc staged: total", rows[-1]["seconds"] + rows[-2]["seconds"])
    direct = WeightPublisher(engine.module, "inproc", name="bench", mode="direct")
    add("inproc direct", timeit(lambda: direct.publish(next(v)), device, a.reps))
    clear_registry("bench")
    del gen, sub

    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as d:
        versions = list(range(1, a.reps + 2))
        ctx = mp.get_context("spawn")
        q, go = ctx.Queue(), ctx.Queue()
        reader = ctx.Process(target=_shm_reader, args=(vars(margs) | {"extra": {}}, str(device), str(gen_dtype).split(".")[1],
                                                       d, "bench", versions, q, go))
        reader.start()
        try:
            ready = q.get(timeout=600)
        except Exception:
            reader.kill()
            raise
        assert ready == "ready"
        pub = WeightPublisher(engine.module, "shm", name="bench", directory=d, dtype=gen_dtype)
        pubs = []
        for ver in versions:
            sync(device)
            t0 = time.perf_counter()
            pub.publish(ver)
            sync(device)
            pubs.append(time.perf_counter() - t0)
            go.put(ver)
            assert q.get(timeout=600) == "done"
        fetches = q.get(timeout=600)
        reader.join(60)
        add("shm: publish (trainer process)", statistics.median(pubs[1:]))
        add("shm: fetch (other process)", statistics.median(fetches[1:]))
        add("shm: total", rows[-1]["seconds"] + rows[-2]["seconds"])

    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "model": "tiny" if a.smoke else "Qwen2.5-0.5B shape (random)", "params": sum(p.numel() for p in trainer_model.parameters()),
              "trainer_bytes": n_bytes, "generator_dtype": str(gen_dtype), "batch": a.batch, "seq": a.seq,
              "train_step_s": t_step, "rows": rows}
    print(f"device={result['device']}  model={result['model']}  params={result['params'] / 1e6:.1f}M  "
          f"train step ({a.batch}x{a.seq} tokens) = {t_step * 1e3:.1f} ms")
    print(f"{'path':34s} {'ms':>10s} {'% of step':>10s} {'GB/s':>8s}")
    for r in rows:
        print(f"{r['path']:34s} {r['seconds'] * 1e3:10.2f} {100 * r['fraction_of_step']:9.2f}% {r['GB_per_s']:8.2f}")
    if a.out:
        _record.write_json(a.out, result, indent=1)


if __name__ == "__main__":
    main()
