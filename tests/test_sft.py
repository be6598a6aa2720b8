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
from forge.models.logprobs import compute_logprobs
from forge.models.tokenizer import load_tokenizer, tiny_tokenizer_path
from forge.trainer.engine import TrainEngine
from forge.trainer.step import sft_loss

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
    # too long: the prompt's start goes first, then the completion's end; one prompt token stays
    ids, p_len = encode_example(tok, {"request": "123+456=", "completion": "579"}, 5)
    prompt = tok.encode("123+456=", add_special_tokens=False)
    assert p_len == 1 and ids == prompt[-1:] + tok.encode("579", add_special_tokens=False) + [tok.eos_token_id]
    ids, p_len = encode_example(tok, {"request": "1+1=", "completion": "123456789"}, 4)
    assert p_len == 1 and len(ids) == 4 and ids[1:] == tok.encode("123", add_special_tokens=False)
    with pytest.raises(ValueError, match="neither a 'completion' nor a 'target'"):
        encode_example(tok, {"request": "1+1="}, 16)


def test_sft_loss_ignores_prompt_positions():
    """Changing the logits (and so the labels' logprobs) at prompt positions, even to NaN, leaves
    the loss unchanged, and their gradient is exactly zero; completion positions do get gradient."""
    gen = torch.Generator().manual_seed(0)
    b, t, v = 3, 10, 50
    tokens = torch.randint(0, v, (b, t), generator=gen)
    mask = torch.zeros(b, t - 1)  # over label positions (logits at t predict tokens[t + 1])
    for i, p in enumerate([3, 5, 8]):
        mask[i, p - 1:] = 1  # prompt of p tokens: labels p.. are completion tokens

    def loss_of(logits):
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        return sft_loss(lp, mask)

    logits = torch.randn(b, t, v, generator=gen, requires_grad=True)
    loss_t = loss_of(logits)
    loss_t.backward()
    loss = float(loss_t.detach())
    prompt_pos = torch.cat([mask == 0, torch.ones(b, 1, dtype=torch.bool)], 1)  # the last logit predicts nothing
    assert logits.grad[prompt_pos].abs().max() == 0
    assert (logits.grad[~prompt_pos].abs().sum(-1) > 0).all()
    changed = logits.detach().clone()
    changed[prompt_pos] = torch.randn(int(prompt_pos.sum()), v, generator=gen) * 10
    assert float(loss_of(changed)) == pytest.approx(loss, rel=1e-6)
    changed[prompt_pos] = float("nan")
    assert float(loss_of(changed)) == pytest.approx(loss, rel=1e-6)
    # and it is the mean negative logprob of the completion labels
    with torch.no_grad():
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    assert loss == pytest.approx(float(-lp[mask.bool()].mean()), rel=1e-6)


def test_train_step_gives_prompt_positions_no_gradient(tok):
    """Through the trainer's real step (packing, micro-batching): the loss is the mean negative
    logprob of the completion tokens, and the final hidden states at positions that predict
    prompt tokens (hence their logits) get exactly zero gradient."""
    ids, p_len = encode_example(tok, {"request": "123+456=", "completion": "579"}, 64)
    batch = make_batch([(ids, p_len)], pad_id=0)
    engine = tiny_engine()
    with torch.no_grad():
        lp = compute_logprobs(engine.model, batch["tokens"], response_mask=batch["loss_mask"])
    m = batch["loss_mask"].float()
    expected = float(-(lp * m).sum() / m.sum())
    grads = []

    def keep_grad(_mod, _inp, out):
        out.register_hook(lambda g: grads.append(g.detach().clone()))

    handle = engine.model.model.norm.register_forward_hook(keep_grad)
    try:
        loss = engine.sft_step(batch)
    finally:
        handle.remove()
    assert loss == pytest.approx(expected, rel=1e-5)
    g = grads[0].reshape(-1, grads[0].shape[-1])[: len(ids)].norm(dim=-1)  # one sequence: row = its positions
    assert g[: p_len - 1].max() == 0  # positions 0..p_len-2 predict prompt tokens
    assert (g[p_len - 1 : len(ids) - 1] > 0).all()  # positions predicting completion tokens + eos


def test_packing_gives_the_same_loss_and_gradient_as_one_sequence_per_row():
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 9, 3, 12]
    tokens = torch.zeros(4, 12, dtype=torch.long)
    mask = torch.zeros(4, 12, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.randint(3, 500, (n,), generator=gen)
        mask[i, 2:n] = 1
    batch = {"tokens": tokens, "loss_mask": mask, "lengths": torch.tensor(lengths)}
    packed = tiny_engine()
    packed.cfg.training.max_tokens_per_microbatch = 64  # all four in one packed row
    one = tiny_engine()
    one.cfg.training.max_tokens_per_microbatch = 12  # one sequence per micro-batch
    assert packed.sft_step(batch) == pytest.approx(one.sft_step(batch), rel=1e-5)
    # the same gradient too (its norm; Adam's first update is ~lr*sign(g), too coarse to compare)
    assert packed.last_grad_norm == pytest.approx(one.last_grad_norm, rel=1e-4)


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
    # a missing model directory parses (paths are checked when run) and then fails clearly
    cfg, _ = load_sft_config(to_container(compose(parse_cli([
        "--config", str(ROOT / "apps" / "sft" / "llama3_8b.yaml"), "--model", str(tmp_path / "no_such_model"),
        "--output_dir", str(tmp_path / "out")]))))
    assert cfg.model.endswith("no_such_model")
    with pytest.raises(FileNotFoundError, match=r"model directory '.*no_such_model' does not exist"):
        run_sft(cfg, quiet=True)


def test_cli_end_to_end_writes_metrics_and_a_loadable_export(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "apps.sft.main", "--steps", "5", "--batch_size", "8",
                           "--eval.num_samples", "8", "--output_dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(6))  # step 0: the evaluation before training
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1] and "eval/loss" in rows[-1]
    for key in ("sft/loss", "sft_trainer/lr", "sft_trainer/grad_norm", "sft_trainer/tokens_per_s"):
        assert all(key in r for r in rows[1:]), key
    assert rows[-1]["sft/loss"] < rows[1]["sft/loss"]
    assert "held-out accuracy:" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy_after"] == rows[-1]["eval/accuracy"] and summary["steps"] == 5
    assert 0 < summary["train_seconds"] and 0 < summary["eval_seconds"]
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
