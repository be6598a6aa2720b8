"""Shared loss helpers (aggregation, KL estimators, overlong penalty), input errors, `build_loss`."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from forge.config import registry
from forge.losses import (
    DAPOLoss,
    GRPOLoss,
    GSPOLoss,
    SimpleGRPOLoss,
    aggregate,
    build_loss,
    kl_penalty,
    overlong_penalty,
)


def rand_mask(B: int, T: int) -> torch.Tensor:
    m = (torch.rand(B, T) < 0.7).double()
    m[0] = 0  # one empty row
    m[1, 0] = 1
    return m


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_aggregate_modes(mode):
    B, T = 5, 6
    x = torch.randn(B, T, dtype=torch.float64)
    m = rand_mask(B, T)
    x_garbage = torch.where(m.bool(), x, torch.randn(B, T, dtype=torch.float64) * 1e3)
    got = aggregate(x_garbage * m, m, mode, max_len=9)
    rows = [[float(x[b, t]) for t in range(T) if m[b, t]] for b in range(B)]
    rows = [r for r in rows if r]
    if mode == "token-mean":
        want = sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    elif mode == "seq-mean-token-mean":
        want = sum(sum(r) / len(r) for r in rows) / len(rows)
    elif mode == "seq-mean-token-sum":
        want = sum(sum(r) for r in rows) / len(rows)
    else:
        want = sum(sum(r) / 9 for r in rows) / len(rows)
    assert got.item() == pytest.approx(want, rel=1e-12)
    assert aggregate(x, torch.zeros(B, T, dtype=torch.float64), mode).item() == 0


def test_aggregate_norm_defaults_to_width_and_bad_mode():
    x, m = torch.randn(3, 4), torch.ones(3, 4)
    assert aggregate(x, m, "seq-mean-token-sum-norm").item() == pytest.approx(x.sum().item() / 12, rel=1e-6)
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(x, m, "seq-mean")


def test_kl_estimators():
    lp = -torch.rand(20, dtype=torch.float64) * 3
    ref = lp + torch.randn(20, dtype=torch.float64)
    for i in range(20):
        a, b = float(lp[i]), float(ref[i])
        r = math.exp(b - a)
        assert kl_penalty(lp, ref, "k1")[i].item() == pytest.approx(a - b)
        assert kl_penalty(lp, ref, "k2")[i].item() == pytest.approx(0.5 * math.log(r) ** 2)
        assert kl_penalty(lp, ref, "k3")[i].item() == pytest.approx(r - 1 - math.log(r))
    assert (kl_penalty(lp, ref, "low_var") >= 0).all()
    assert kl_penalty(lp, lp, "k3").abs().max() == 0
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(lp, ref, "k4")


def test_overlong_penalty():
    # L_max = 20, L_cache = 4: free up to 16, linear to -1 at 20, -1 beyond
    got = overlong_penalty([3, 16, 17, 18, 20, 21, 100], max_len=20, buffer=4)
    assert got.tolist() == pytest.approx([0, 0, -0.25, -0.5, -1.0, -1.0, -1.0])
    assert overlong_penalty(torch.tensor([18]), 20, 4, factor=2.0).item() == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        overlong_penalty([1], max_len=4, buffer=5)


# ----------------------------------------------------------------------------- bad input


def good(B=3, T=4):
    lp = -torch.rand(B, T) - 0.1
    return dict(logprobs=lp, ref_logprobs=lp + 0.1 * torch.randn(B, T), advantages=torch.randn(B),
                padding_mask=torch.ones(B, T))


def run(loss, **over):
    d = {**good(), **over}
    return loss(d.pop("logprobs"), d.pop("ref_logprobs"), d.pop("advantages"), d.pop("padding_mask"), **d)


def test_bad_inputs_raise_clear_errors():
    loss = GRPOLoss(beta=0.1)
    with pytest.raises(ValueError, match=r"ref_logprobs has shape \(3, 5\) but logprobs has \(3, 4\)"):
        run(loss, ref_logprobs=torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"padding_mask has shape \(2, 4\)"):
        run(loss, padding_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"advantages has shape \(4,\)"):
        run(loss, advantages=torch.randn(4))
    with pytest.raises(ValueError, match=r"old_logprobs has shape"):
        run(loss, old_logprobs=torch.randn(4, 4))
    with pytest.raises(ValueError, match="0/1"):
        run(loss, padding_mask=torch.full((3, 4), 0.5))
    with pytest.raises(ValueError, match="0/1"):
        run(loss, padding_mask=torch.full((3, 4), 2))
    with pytest.raises(ValueError, match="advantages has NaN"):
        run(loss, advantages=torch.tensor([0.1, float("nan"), 0.3]))
    bad = good()["logprobs"]
    bad[1, 2] = -math.inf
    with pytest.raises(ValueError, match="logprobs has NaN or inf"):
        run(loss, logprobs=bad)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        run(loss, ref_logprobs=None)
    with pytest.raises(ValueError, match=r"\[batch, response_len\]"):
        GRPOLoss(beta=0)(torch.randn(4), None, torch.randn(4), torch.ones(4))
    # NaN/inf at padded positions is fine
    m = torch.ones(3, 4)
    m[:, 3] = 0
    lp = good()["logprobs"]
    lp[:, 3] = float("nan")
    adv = torch.randn(3, 4)
    adv[:, 3] = math.inf
    assert torch.isfinite(run(loss, logprobs=lp, padding_mask=m, advantages=adv))
    # bool masks are accepted
    assert torch.isfinite(run(loss, padding_mask=torch.ones(3, 4, dtype=torch.bool)))


def test_bad_constructor_args():
    with pytest.raises(ValueError, match="aggregation"):
        GRPOLoss(agg="mean")
    with pytest.raises(ValueError, match="KL estimator"):
        GRPOLoss(kl_estimator="k9")
    with pytest.raises(ValueError, match="dual_clip"):
        GRPOLoss(dual_clip=0.5)
    with pytest.raises(ValueError, match="tis_cap"):
        GRPOLoss(tis_cap=0)


# ----------------------------------------------------------------------------- registry


def test_build_loss_names():
    for spec, cls in [("grpo", GRPOLoss), ("GRPOLoss", GRPOLoss), ("gspo", GSPOLoss), ("GSPO", GSPOLoss),
                      ("simple_grpo", SimpleGRPOLoss), ("SimpleGRPOLoss", SimpleGRPOLoss), ("dapo", DAPOLoss)]:
        assert type(build_loss(spec)) is cls
    losses = registry.registered("loss")
    assert len(set(losses.values())) == 11  # every built-in loss registered itself at import
    for name, cls in losses.items():
        assert type(build_loss(name)) is cls
        assert type(build_loss(name.lower())) is cls
        assert type(build_loss(name.upper().replace("_", "-"))) is cls


def test_build_loss_dicts_and_paths():
    l = build_loss({"_target_": "GSPOLoss", "clip_low": 1e-3})
    assert isinstance(l, GSPOLoss) and l.clip_low == 1e-3
    l = build_loss({"name": "dapo", "clip_high": 0.3})
    assert isinstance(l, DAPOLoss) and l.clip_high == 0.3
    l = build_loss({"_target_": "forge.losses.gspo.GSPOLoss", "clip_high": 5e-4})
    assert isinstance(l, GSPOLoss) and l.clip_high == 5e-4
    l = build_loss("forge.losses.GRPOLoss", beta=0.0)
    assert isinstance(l, GRPOLoss) and not l.needs_ref
    l = build_loss(OmegaConf.create({"_target_": "grpo", "clip_low": 0.1, "agg": "token-mean"}))
    assert l.clip_low == 0.1 and l.agg == "token-mean"
    l = build_loss("torch.nn.MSELoss")
    assert isinstance(l, torch.nn.MSELoss)
    inst = GRPOLoss()
    assert build_loss(inst) is inst


def test_build_loss_errors():
    with pytest.raises(ValueError, match=r"unknown loss 'gspoo'.*Did you mean 'gspo'.*cispo"):
        build_loss("gspoo")
    with pytest.raises(ValueError, match="cannot import"):
        build_loss("nosuch.module.Loss")
    with pytest.raises(TypeError, match="GSPOLoss"):
        build_loss({"_target_": "gspo", "clip_lo": 1})
    with pytest.raises(ValueError, match="_target_"):
        build_loss({"clip_low": 1})
    with pytest.raises(TypeError, match="not an nn.Module"):
        build_loss("math.sqrt")


def test_kl_abs_estimator_is_abs_log_ratio():
    """verl's `abs` KL penalty: |log r| per token, >= 0, beside k1/k2/k3."""
    lp, ref = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    got = kl_penalty(lp, ref, "abs")
    for i in range(3):
        for t in range(7):
            assert got[i, t].item() == pytest.approx(abs(ref[i, t].item() - lp[i, t].item()), rel=1e-12)
    assert torch.equal(got, kl_penalty(lp, ref, "k1").abs())


def test_grpo_config_names_only_advantage_methods_that_exist():
    """apps/grpo/config.py's comment listed `pass_at_k`, which compute_advantages rejects."""
    import re
    from pathlib import Path

    from forge.advantages import compute_advantages

    src = (Path(__file__).parents[1] / "apps/grpo/config.py").read_text()
    line = next(ln for ln in src.splitlines() if ln.strip().startswith("method: str ="))
    names = [n.strip() for n in line.split("#", 1)[1].split("|")]
    assert len(names) >= 8
    for name in names:
        assert re.fullmatch(r"[a-z_+]+", name), name
        compute_advantages([0.0, 1.0], method=name, lengths=[2, 3], k=1, log_metrics=False)
