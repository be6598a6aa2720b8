"""FSDP2 over N procs gives the same training as one proc: the real `Trainer` actor under the
monarch provisioner, same weights, same batches, a few AdamW steps; per-step losses and the final
log-probabilities compared.

    python bench/fsdp_parity.py --procs 2 --out fsdp_parity.json        # GPUs: one per proc, NCCL
    python bench/fsdp_parity.py --smoke                                 # CPU: 2 procs, gloo, tiny shape

On a GPU host each proc gets a GPU of its own (`with_gpus: true`). Runs fp32 (the tolerance is
then reduction order only) and bf16 autocast (reported; looser tolerance).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _record  # noqa: E402  (bench/_record.py: commit, command, device, date in every result file)
import torch  # noqa: E402

from bench.grpo_step import SHAPES, write_checkpoint  # noqa: E402

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}  # relative, on the loss


async def run_trainer(model_dir: str, procs: int, gpu: bool, dtype: str, batches: list, lr: float) -> dict:
    from forge.actors import Trainer

    trainer = await Trainer.options(procs=procs, with_gpus=gpu).as_actor(
        model={"path": model_dir}, loss={"name": "grpo", "beta": 0.0, "agg": "seq-mean-token-mean"},
        optimizer={"lr": lr}, training={"max_tokens_per_microbatch": 4096, "dtype": dtype, "max_norm": 1.0})
    losses, times = [], []
    for inputs, targets in batches:
        t0 = time.perf_counter()
        per_rank = await trainer.train_step.call(inputs, targets)
        times.append(time.perf_counter() - t0)
        losses.append(float(per_rank[0]))
    lp = (await trainer.forward_logprobs.call(*batches[0]))[0]
    await trainer.shutdown()
    return {"losses": losses, "logprobs": lp, "step_s": times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256, help="prompt and response length each")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.smoke:
        a.shape, a.steps, a.batch, a.seq, a.dtypes, a.lr = "tiny", 3, 4, 16, "float32", 1e-3
    gpu = torch.cuda.is_available()
    if gpu and a.procs > torch.cuda.device_count():
        raise SystemExit(f"--procs {a.procs}: this host has {torch.cuda.device_count()} GPU(s)")

    from forge.controller import init_provisioner, shutdown
    from forge.trainer.testing import random_rl_batch

    seed = int(torch.randint(0, 1 << 30, (1,)))  # fresh inputs every run
    vocab = SHAPES[a.shape]["vocab_size"]
    batches = [random_rl_batch(batch=a.batch, prompt_len=a.seq, response_len=a.seq, vocab=vocab, seed=seed + i)
               for i in range(a.steps)]
    results: dict = {"shape": a.shape, "procs": a.procs, "seed": seed,
                     "device": torch.cuda.get_device_name(0) if gpu else "cpu", "dtypes": {}}
    ok = True

    async def go() -> None:
        nonlocal ok
        init_provisioner("monarch")
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = str(write_checkpoint(a.shape, Path(tmp) / "model", torch.float32))
            for dtype in a.dtypes.split(","):
                one = await run_trainer(ckpt, 1, gpu, dtype, batches, a.lr)
                print(f"{dtype}: 1 proc losses {one['losses']}", flush=True)
                many = await run_trainer(ckpt, a.procs, gpu, dtype, batches, a.lr)
                print(f"{dtype}: {a.procs} procs losses {many['losses']}", flush=True)
                rel = [abs(x - y) / max(abs(x), 1e-6) for x, y in zip(one["losses"], many["losses"])]
                mask = batches[0][1][0]["padding_mask"].bool()
                lp_diff = float((one["logprobs"] - many["logprobs"])[mask].abs().max())
                passed = max(rel) <= TOLERANCE[dtype]
                ok &= passed
                results["dtypes"][dtype] = {
                    "losses_1": one["losses"], f"losses_{a.procs}": many["losses"], "max_rel_loss_diff": max(rel),
                    "max_abs_logprob_diff_after": lp_diff, "tolerance": TOLERANCE[dtype], "passed": passed,
                    "step_s_1": sum(one["step_s"][1:]) / max(1, len(one["step_s"]) - 1),
                    f"step_s_{a.procs}": sum(many["step_s"][1:]) / max(1, len(many["step_s"]) - 1)}
        await shutdown()

    asyncio.run(go())
    print(f"\nFSDP2 parity: {a.shape}, 1 vs {a.procs} procs, {a.steps} steps of {a.batch} x {2 * a.seq} tokens, "
          f"device {results['device']}, seed {seed}")
    print(f"{'dtype':<10}{'step':>5}{'loss 1 proc':>14}{f'loss {a.procs} procs':>15}{'rel diff':>11}")
    for dtype, r in results["dtypes"].items():
        for i, (x, y) in enumerate(zip(r["losses_1"], r[f"losses_{a.procs}"])):
            print(f"{dtype:<10}{i:>5}{x:>14.6f}{y:>15.6f}{abs(x - y) / max(abs(x), 1e-6):>11.2e}")
        print(f"{dtype:<10} max |dlogprob| after training {r['max_abs_logprob_diff_after']:.2e}; "
              f"s/step 1 proc {r['step_s_1']:.3f}, {a.procs} procs {r[f'step_s_{a.procs}']:.3f}; "
              f"{'PASS' if r['passed'] else 'FAIL'} (tol {r['tolerance']:g})")
    if a.out:
        _record.write_json(a.out, results, indent=2)
        print(f"wrote {a.out}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
