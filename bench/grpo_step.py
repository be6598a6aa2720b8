"""Seconds per GRPO step and its split by phase, sync (off_by_n 0) vs async (off_by_n 1), in one run.

    python bench/grpo_step.py --out grpo_step.json                 # one GPU, one process, Qwen2.5-0.5B shape
    python bench/grpo_step.py --separate-processes                 # one GPU shared by generator + trainer processes
    python bench/grpo_step.py --gpus 4 --shapes qwen2.5-0.5b,qwen2.5-1.5b
                                  # services on GPUs of their own: 2 generator replicas, trainer FSDP2 over 2
    python bench/grpo_step.py --smoke                              # CPU, tiny shape, seconds
    python bench/grpo_step.py --smoke --gpus 3 --transport broadcast   # CPU: the multi-process layout, gloo
    python bench/grpo_step.py --hosts 3 --modes async              # 3 Monarch process hosts (ProcessJob) sharing
                                  # this machine's GPU: generator | trainer | reward + reference, one host each
    python bench/grpo_step.py --smoke --hosts 3                    # the same on CPU (weights by gloo broadcast)
    python bench/grpo_step.py --lora 32 --modes sync --shapes qwen3-1.7b,qwen3-8b
                                  # full fine-tuning and LoRA r=32 (all-linear, alpha 2r) of each shape, one run

Runs the real GRPO app (apps/grpo/main.py) on a random-weight checkpoint of the given shape
with the built-in arithmetic prompts; every response is exactly --tokens tokens long (EOS
ignored), so the work per step is fixed: --prompts prompts x --group samples x --tokens tokens.
The reward is the app's math reward (≈0 on random weights; timing does not depend on it).
With --lora r each mode also runs with LoRA (`lora: {r, alpha: 2r, target_modules: all-linear}`, the
frozen base kept in bf16 on GPU) and records peak device memory, the trainer's weights+grads+AdamW
bytes, and weight-sync seconds and bytes, next to full fine-tuning's. A variant that does not fit
(CUDA out of memory) is recorded as such and the run goes on.
Per mode: wall seconds per training step (steady state: the first --warmup steps dropped) and
the mean per-phase times the app records (generate = one group's generation latency, train,
weight sync, waiting for a batch).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _record  # noqa: E402  (bench/_record.py: commit, command, device, date in every result file)
import torch  # noqa: E402

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, attention_bias=True,
                         rope_theta=1000000.0, max_position_embeddings=4096),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, attention_bias=True,
                         rope_theta=1000000.0, max_position_embeddings=4096),
    "qwen3-1.7b": dict(family="qwen3", hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True, qk_norm=True, rope_theta=1000000.0, max_position_embeddings=4096),
    "qwen3-8b": dict(family="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     tie_word_embeddings=False, qk_norm=True, rope_theta=1000000.0, max_position_embeddings=4096),
    "qwen3-4b": dict(family="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     tie_word_embeddings=True, qk_norm=True, rope_theta=1000000.0, max_position_embeddings=4096),
    "qwen3-14b": dict(family="qwen3", hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                      tie_word_embeddings=False, qk_norm=True, rope_theta=1000000.0, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, attention_bias=True,
                 max_position_embeddings=1024),
}


def write_checkpoint(shape: str, path: Path, dtype: torch.dtype) -> Path:
    from forge.models.args import ModelArgs
    from forge.models.decoder import CausalLM
    from forge.models.hf_io import save_model
    from forge.models.tokenizer import load_tokenizer, tiny_tokenizer_path

    shape_args = dict(SHAPES[shape])
    args = ModelArgs(family=shape_args.pop("family", "qwen2"), eos_token_id=2, pad_token_id=0, **shape_args)
    model = CausalLM(args)
    model.init_weights(std=0.02, seed=0)
    return save_model(model, path, dtype=dtype, tokenizer=load_tokenizer(tiny_tokenizer_path()))


def layout(a: argparse.Namespace) -> tuple[int, int]:
    """(generator replicas, trainer procs) for --gpus; one GPU (or none): (1, 1)."""
    if a.gpus <= 1:
        return 1, 1
    gen = a.policy_replicas or max(1, a.gpus // 2)
    trainer = a.trainer_procs or a.gpus - gen
    if gen + trainer > a.gpus:
        raise SystemExit(f"--policy-replicas {gen} + --trainer-procs {trainer} > --gpus {a.gpus}")
    return gen, trainer


def app_config(model: str, mode: str, a: argparse.Namespace, run_dir: Path, gpu: bool, lora_r: int = 0) -> dict:
    off_by_n = {"sync": 0, "async": 1}[mode]
    gen, trainer_procs = layout(a)
    separate = a.separate_processes or a.gpus > 1
    placements: dict = {"services": {}, "actors": {}}
    if a.hosts > 1:  # a Monarch ProcessJob: generator | trainer | reward + reference, a host group each
        groups = {"gen": 1, "train": 1, **({"rr": a.hosts - 2} if a.hosts > 2 else {})}
        provisioner: dict | str = {"kind": "monarch", "job": "process", "meshes": groups, "share_gpus": a.gpus <= 1}
        rr = "rr" if a.hosts > 2 else "gen"
        placements = {"services": {"policy": "gen", "ref_model": rr, "reward_actor": rr},
                      "actors": {"trainer": "train", "replay_buffer": "train", "dataset": "train",
                                 "compute_advantages": "train"}}
    elif a.gpus > 1:  # each service on GPUs of its own (on a CPU-only host: the same processes, no GPUs)
        provisioner: dict | str = {"kind": "monarch"}
    elif separate:  # separate processes on one GPU: generator and trainer processes share it
        provisioner = {"kind": "monarch", "share_gpus": True}
    else:
        provisioner = "local"
    weight_sync = {"transport": a.transport} if a.transport else {}
    return {
        "model": model, "seed": 0, "provisioner": provisioner,
        "group_size": a.group, "local_batch_size": a.prompts * a.group,
        "max_req_tokens": 32, "max_res_tokens": a.tokens, "off_by_n": off_by_n,
        "rollout_threads": a.prompts, "steps": a.steps, "output_dir": str(run_dir),
        "samples_every": 0, "loss": {"name": "grpo", "beta": 0.0, "clip_low": 0.2, "clip_high": 0.28},
        "rewards": [{"name": "math"}], "dataset": {"task": "arithmetic", "task_kwargs": {"difficulty": 3}},
        "policy": {"engine_args": {"max_num_seqs": a.prompts * a.group, "kv_cache_tokens": a.prompts * a.group * (a.tokens + 64),
                                   "block_size": 16},
                   "sampling_params": {"temperature": 1.0, "ignore_eos": True, "max_tokens": a.tokens}},
        "trainer": {"optimizer": {"lr": 1e-6}, "training": {"max_tokens_per_microbatch": a.microbatch_tokens,
                                                            "dtype": "bfloat16" if gpu else "float32", "max_norm": 1.0},
                    "weight_sync": weight_sync},
        "eval": {"num_samples": 0},
        "metric_logging": {"jsonl": {}},
        "services": {"policy": {"with_gpus": gpu, "num_replicas": gen}, "ref_model": {"with_gpus": gpu},
                     "reward_actor": {}},
        "actors": {"trainer": {"with_gpus": gpu, "procs": trainer_procs}},
        **({"services": {"policy": {"with_gpus": gpu, "num_replicas": gen, "mesh_name": "gen"},
                         "ref_model": {"with_gpus": gpu, "mesh_name": placements["services"]["ref_model"]},
                         "reward_actor": {"mesh_name": placements["services"]["reward_actor"]}},
            "actors": {"trainer": {"with_gpus": gpu, "procs": trainer_procs, "mesh_name": "train"},
                       **{k: {"mesh_name": v} for k, v in placements["actors"].items() if k != "trainer"}}}
           if a.hosts > 1 else {}),
        **({"lora": {"r": lora_r, "alpha": 2 * lora_r, "target_modules": "all-linear",
                     "base_dtype": "bfloat16" if gpu and trainer_procs == 1 else None}} if lora_r else {}),
    }


def summarize(run_dir: Path, warmup: int) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/step_s" in r][warmup:]
    if not steps:
        raise RuntimeError(f"no steady-state steps recorded in {run_dir}")
    t = [r["time"] for r in steps]
    wall = (t[-1] - t[0]) / max(1, len(t) - 1) if len(t) > 1 else steps[0]["time/step_s"]

    def mean(key: str) -> float:
        vals = [r[key] for r in steps if key in r]
        return statistics.fmean(vals) if vals else float("nan")

    return {
        "s_per_step": wall,
        "generate_group_s": mean("time/generate_s"),
        "train_s": mean("time/train_s"),
        "weight_sync_s": mean("time/weight_sync_s"),
        "wait_for_batch_s": mean("time/wait_for_batch_s"),
        "policy_age": mean("buffer/sample/avg_sampled_policy_age"),
        "gen_tokens_per_s": mean("generator/tokens_per_s"),
        "sync_push_s": mean("weight_sync/push_s"),
        "sync_bytes": mean("weight_sync/push_bytes"),
        "trainer_state_gb": mean("rl_trainer/train_state_gb"),
        "peak_memory_gb": max([r["rl_trainer/peak_memory_gb"] for r in steps if "rl_trainer/peak_memory_gb" in r],
                              default=float("nan")),
        "steps_measured": len(steps),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--shapes", "--shape", dest="shapes", default="qwen2.5-0.5b",
                   help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--modes", default="sync,async")
    p.add_argument("--gpus", type=int, default=1, help=">1: generator replicas and trainer procs on GPUs of their own")
    p.add_argument("--policy-replicas", type=int, default=0, help="with --gpus > 1 (default gpus // 2)")
    p.add_argument("--trainer-procs", type=int, default=0, help="with --gpus > 1 (default the rest: FSDP2)")
    p.add_argument("--separate-processes", action="store_true", help="monarch provisioner: one process per service")
    p.add_argument("--hosts", type=int, default=1,
                   help=">1: services on N Monarch process hosts (generator | trainer | reward + reference)")
    p.add_argument("--transport", default=None, choices=["inproc", "shm", "cuda_ipc", "broadcast"],
                   help="weight sync (default: the app's choice: inproc / broadcast on own GPUs / shm)")
    p.add_argument("--microbatch-tokens", type=int, default=16384)
    p.add_argument("--lora", type=int, default=0, metavar="R",
                   help="also run each mode with LoRA rank R (all-linear, alpha 2R) to compare with full fine-tuning")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.smoke:
        a.shapes, a.prompts, a.group, a.tokens, a.steps, a.warmup = "tiny", 2, 4, 8, 4, 1
    shapes = a.shapes.split(",")
    for sh in shapes:
        if sh not in SHAPES:
            raise SystemExit(f"--shapes: unknown shape {sh!r}; known: {sorted(SHAPES)}")
    gpu = torch.cuda.is_available()
    if gpu and a.gpus > torch.cuda.device_count():
        raise SystemExit(f"--gpus {a.gpus}: this host has {torch.cuda.device_count()} GPU(s)")
    if a.hosts < 1:
        raise SystemExit(f"--hosts must be >= 1, got {a.hosts}")
    gen, trainer_procs = layout(a)
    separate = a.separate_processes or a.gpus > 1 or a.hosts > 1

    from apps.grpo.config import load_grpo_config
    from apps.grpo.main import main as grpo_main

    results: dict = {"prompts": a.prompts, "group": a.group, "tokens": a.tokens, "gpus": a.gpus,
                     "device": torch.cuda.get_device_name(0) if gpu else "cpu", "separate_processes": separate,
                     "policy_replicas": gen, "trainer_procs": trainer_procs, "hosts": a.hosts, "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            ckpt = write_checkpoint(shape, Path(tmp) / f"model_{shape}", torch.bfloat16 if gpu else torch.float32)
            per_mode: dict = {}
            runs = [(m, m, 0) for m in a.modes.split(",")]
            if a.lora:  # LoRA first: a full fine-tuning run that does not fit must not crowd it out
                runs = [(f"{m}+lora{a.lora}", m, a.lora) for m in a.modes.split(",")] + runs
            for label, mode, lora_r in runs:
                run_dir = Path(tmp) / f"run_{shape}_{label}"
                cfg, _ = load_grpo_config(app_config(str(ckpt), mode, a, run_dir, gpu, lora_r))
                t0 = time.perf_counter()
                try:
                    asyncio.run(grpo_main(cfg))
                except Exception as e:  # e.g. full fine-tuning of a shape that does not fit: say so, go on
                    if not a.lora:
                        raise
                    per_mode[label] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                    print(f"{shape} {label}: {per_mode[label]['error']}")
                if "error" in per_mode.get(label, {}):
                    gc.collect()  # the failed run's tensors live on in the exception's frames until now
                    if gpu:
                        torch.cuda.empty_cache()
                    continue
                res = summarize(run_dir, a.warmup)
                res["total_s"] = time.perf_counter() - t0
                res["weight_sync_frac"] = res["weight_sync_s"] / res["s_per_step"]
                per_mode[label] = res
                if gpu:
                    torch.cuda.reset_peak_memory_stats()
                    torch.cuda.empty_cache()
                results["shapes"][shape] = per_mode
                if a.out:  # after every mode: a run cut short still leaves what it measured
                    _record.write_json(a.out, results, indent=2)
            if {"sync", "async"} <= set(per_mode) and not any("error" in per_mode[m] for m in ("sync", "async")):
                per_mode["async_speedup"] = per_mode["sync"]["s_per_step"] / per_mode["async"]["s_per_step"]
            results["shapes"][shape] = per_mode

    where = (f"{a.hosts} Monarch process hosts (generator | trainer | reward + reference)" if a.hosts > 1
             else f"{a.gpus} GPUs: {gen} generator replica(s), trainer over {trainer_procs} proc(s)" if a.gpus > 1
             else "separate processes" if separate else "one process")
    print(f"\nGRPO step: {a.prompts} prompts x {a.group} samples x {a.tokens} tokens, device {results['device']}, {where}")
    print(f"{'shape':<14}{'mode':<14}{'s/step':>9}{'gen/group s':>13}{'train s':>9}{'sync s':>9}{'sync %':>8}"
          f"{'wait s':>9}{'age':>6}{'sync MB':>10}{'state GB':>10}{'peak GB':>9}")
    for shape, per_mode in results["shapes"].items():
        for mode, r in per_mode.items():
            if mode == "async_speedup":
                continue
            if "error" in r:
                print(f"{shape:<14}{mode:<14}{r['error'][:80]}")
                continue
            print(f"{shape:<14}{mode:<14}{r['s_per_step']:>9.3f}{r['generate_group_s']:>13.3f}{r['train_s']:>9.3f}"
                  f"{r['weight_sync_s']:>9.3f}{100 * r['weight_sync_frac']:>7.1f}%{r['wait_for_batch_s']:>9.3f}"
                  f"{r['policy_age']:>6.2f}{r['sync_bytes'] / 1e6:>10.2f}{r['trainer_state_gb']:>10.3f}"
                  f"{r['peak_memory_gb']:>9.2f}")
        if "async_speedup" in per_mode:
            print(f"{shape:<14}async speed-up: {per_mode['async_speedup']:.2f}x")
    if a.out:
        _record.write_json(a.out, results, indent=2)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
