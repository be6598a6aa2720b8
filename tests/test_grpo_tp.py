"""The GRPO app with tensor parallelism on both sides (issue 22): the trainer one replica of 2 Monarch
procs at `trainer.parallelism.tensor_parallel_degree: 2` and the generator one replica of 2 Monarch
procs at `policy.engine_args.tensor_parallel_size: 2` (CPU, gloo; weights by shared memory, each
generator rank copying its own shard), on the embedded default's arithmetic task after the SFT warm-up.
docs/perf/NOTES_tp.md has the measured runs (smallest rise: mean +0.0275, best +0.04, end +0.035)."""

from __future__ import annotations

import asyncio

import pytest

from tests.grpo_learning import EVAL_ARGS, LEARN_STEPS, GreedyProbe, assert_generator_holds_export, assert_learned
from tests.test_grpo_app import config, metrics

TP2 = ["--provisioner", "monarch",
       "--actors.trainer.procs", "2", "--trainer.parallelism.tensor_parallel_degree", "2",
       "--services.policy.procs", "2", "--policy.engine_args.tensor_parallel_size", "2"]


@pytest.mark.slow
@pytest.mark.monarch
@pytest.mark.timeout(2400)  # the first learning test of a session also pays the shared SFT warm-up
def test_grpo_learns_with_tensor_parallel_trainer_and_generator(tmp_path_factory, warmup_cache):
    """Held-out accuracy rises over the SFT start with TP=2 trainer and TP=2 generator, every version
    reaches the generator, and the generator's last weights are the trainer's: its greedy tokens and
    logprobs equal one process's engine on the exported final model (a wrong or stale shard would not)."""
    pytest.importorskip("monarch")
    from apps.grpo.main import main

    run = tmp_path_factory.mktemp("tp") / "run"
    probe = GreedyProbe(LEARN_STEPS)
    cfg = config("--warmup.cache_dir", str(warmup_cache), "--output_dir", str(run), "--steps", str(LEARN_STEPS),
                 "--trainer.optimizer.lr", "3e-4", *EVAL_ARGS, "--off_by_n", "1", "--metric_logging", "{jsonl: {}}", *TP2)
    assert cfg.trainer.parallelism.tensor_parallel_degree == 2 and cfg.policy.engine_args["tensor_parallel_size"] == 2
    out = asyncio.run(main(cfg, on_step=probe))
    assert out["steps"] == LEARN_STEPS

    rows = metrics(run)
    trained = [r for r in rows if "rl_trainer/avg_loss" in r]
    assert len(trained) == LEARN_STEPS and all(r["time/weight_sync_s"] > 0 for r in trained)
    assert probe.versions == [[s] for s in range(1, LEARN_STEPS + 1)]  # every version reached the TP replica
    assert_learned(out, rows, "at TP=2")
    assert_generator_holds_export(run, probe, LEARN_STEPS)  # the TP generator's shards == the TP trainer's weights
