"""apps/sft: prompt masking, packing, resume, configs, end-to-end and the cached warm-up."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from apps.sft.config import load_sft_config
from apps.sft.main import encode_example, make_batch, run_sft
from apps.sft.warmup import ensure_warmup_checkpoint
from forge.config import ConfigError, compose, parse_cli, to_container
from forge.models.tokenizer import load_tokenizer, tiny_tokenizer_path
from forge.trainer.engine import TrainEngine

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(tiny_tokenizer_path())


def tiny_engine(seed: int = 0) -> TrainEngine:
    cfg = {"model": {"tiny": "qwen2", "seed": seed}, "loss": "grpo", "optimizer": {"lr": 1e-3},
           "training": {"dtype": "float32", "max_norm": 0}}
    return TrainEngine(cfg, "cpu")


def test_encode_masks_the_prompt_and_ends_with_eos(tok):
    ids, p_len = encode_example(tok, {"request": "12+7=", "completion": "19"}, 64)
    assert ids[:p_len] == tok.encode("12+7=", add_special_tokens=False)
    assert ids[p_len:] == tok.encode("19", add_special_tokens=False) + [tok.eos_token_id]
    batch = make_batch([(ids, p_len), ([5, 6, 7], 1)], pad_id=0)
    assert batch["loss_mask"][0].tolist() == [0] * p_len + [1] * (len(ids) - p_len)
    assert batch["loss_mask"][1].tolist()[:3] == [0, 1, 1] and batch["loss_mask"][1, 3:].sum() == 0


def test_loss_ignores_prompt_tokens(tok):
    """The SFT loss is -mean logprob over completion tokens only (checked against an independent
    computation), so prompt tokens carry no loss whatever the model predicts for them."""
    gen = torch.Generator().manual_seed(int(time.time()) % 10_000)
    tokens = torch.randint(3, 500, (4, 12), generator=gen)
    mask = torch.zeros(4, 12, dtype=torch.long)
    mask[:, 7:] = 1
    # the loss equals -mean logprob of the completion tokens computed independently
    from forge.models.logprobs import compute_logprobs

    e3 = tiny_engine()
    with torch.no_grad():
        lp = compute_logprobs(e3.model, tokens, response_mask=mask)
    ref = float(-(lp * mask).sum() / mask.sum())
    l3 = e3.sft_step({"tokens": tokens, "loss_mask": mask})
    assert l3 == pytest.approx(ref, rel=1e-5)
    # masking more of the sequence as prompt changes which tokens count
    mask4 = mask.clone()
    mask4[:, 7:9] = 0
    e4 = tiny_engine()
    with torch.no_grad():
        lp4 = compute_logprobs(e4.model, tokens, response_mask=mask4)
    assert e4.sft_step({"tokens": tokens, "loss_mask": mask4}) == pytest.approx(float(-(lp4 * mask4).sum() / mask4.sum()), rel=1e-5)


def test_packing_gives_the_same_loss_as_one_sequence_per_row(tok):
    gen = torch.Generator().manual_seed(int(time.time()) % 10_000 + 1)
    lengths = [5, 9, 3, 12]
    tokens = torch.zeros(4, 12, dtype=torch.long)
    mask = torch.zeros(4, 12, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.randint(3, 500, (n,), generator=gen)
        mask[i, 1:n] = 1
    batch = {"tokens": tokens, "loss_mask": mask, "lengths": torch.tensor(lengths)}
    packed = tiny_engine()
    packed.cfg.training.max_tokens_per_microbatch = 64  # all four in one packed row
    one = tiny_engine()
    one.cfg.training.max_tokens_per_microbatch = 12  # one sequence per micro-batch
    assert packed.sft_step(batch) == pytest.approx(one.sft_step(batch), rel=1e-5)


def sft_cfg(tmp_path: Path, *argv: str):
    cfg, _ = load_sft_config(to_container(compose(parse_cli([
        "--steps", "6", "--batch_size", "8", "--eval.num_samples", "16", "--eval.every", "0",
        "--output_dir", str(tmp_path), "--tiny.hidden_size", "32", "--tiny.num_hidden_layers", "1",
        "--tiny.intermediate_size", "64", *argv]), ROOT / "apps" / "sft" / "default.yaml")))
    return cfg


def test_resume_continues_with_the_same_next_loss(tmp_path):
    straight = sft_cfg(tmp_path / "a", "--trainer.checkpoint.interval", "3", "--metric_logging", "{jsonl: {}}")
    run_sft(straight, quiet=True)
    losses_a = [json.loads(x).get("sft/loss") for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    # a run stopped after 3 steps, then resumed to 6
    first = sft_cfg(tmp_path / "b", "--trainer.checkpoint.interval", "3", "--steps", "3")
    run_sft(first, quiet=True)
    resumed = sft_cfg(tmp_path / "b", "--trainer.checkpoint.interval", "3")
    run_sft(resumed, resume=True, quiet=True)
    losses_b = [json.loads(x).get("sft/loss") for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    a = [x for x in losses_a if x is not None]
    b = [x for x in losses_b if x is not None]
    assert len(a) == 6 and len(b) == 6
    assert b[3] == pytest.approx(a[3], rel=1e-6)  # the first step after resume
    assert b[5] == pytest.approx(a[5], rel=1e-5)


def test_configs_parse_and_a_missing_model_dir_fails_clearly(tmp_path):
    for name in ("llama3_8b.yaml", "qwen2_5_0_5b.yaml"):
        cfg, _ = load_sft_config(to_container(compose(parse_cli(["--config", str(ROOT / "apps" / "sft" / name)]))))
        assert cfg.model.startswith("/models/") and cfg.dataset.get("chat_template") is True
    with pytest.raises(ConfigError, match="did you mean 'dataset.columns'"):
        load_sft_config({"dataset": {"path": "x.jsonl", "colums": {}}})
    cfg = sft_cfg(tmp_path, "--model", str(tmp_path / "no_such_model"))
    with pytest.raises(Exception, match="no_such_model"):
        run_sft(cfg, quiet=True)


def test_cli_end_to_end_writes_metrics_and_a_loadable_export(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "apps.sft.main", "--steps", "5", "--batch_size", "8",
                           "--eval.num_samples", "8", "--output_dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("sft/loss" in r for r in rows) and any("eval/accuracy" in r for r in rows)
    from forge.models.hf_io import load_model

    model = load_model(out / "final_hf")
    assert model.args.hidden_size == 128


def test_warmup_is_cached(tmp_path):
    kw = dict(steps=3, batch_size=8, hidden_size=32, num_hidden_layers=1, cache_dir=tmp_path, eval_samples=8)
    p1 = ensure_warmup_checkpoint(**kw)
    assert (p1 / "config.json").is_file() and (p1 / "tokenizer.json").is_file()
    t0 = time.perf_counter()
    p2 = ensure_warmup_checkpoint(**kw)
    assert p2 == p1 and time.perf_counter() - t0 < 0.5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    assert ensure_warmup_checkpoint(**{**kw, "steps": 4}) != p1  # another recipe, another cache entry
