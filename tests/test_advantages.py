"""`forge.advantages` against per-group loops written from each paper's definition."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest
import torch

from forge.advantages import (
    compute_advantages,
    filter_zero_variance,
    passk_advantages,
    zero_variance_mask,
)
from forge.observability import drain


def grouped(n_groups: int = 4, size: int = 5):
    r = torch.randn(n_groups * size, dtype=torch.float64)
    ids = [f"p{g}" for g in range(n_groups) for _ in range(size)]
    perm = torch.randperm(len(ids)).tolist()  # groups interleaved in the batch
    return r[perm], [ids[i] for i in perm]


def members(ids):
    out: dict = {}
    for i, g in enumerate(ids):
        out.setdefault(g, []).append(i)
    return out


def test_grpo_and_drgrpo():
    r, ids = grouped()
    adv = compute_advantages(r, ids, "grpo")
    dr = compute_advantages(r, ids, "drgrpo")
    nostd = compute_advantages(r, ids, "grpo", normalize_std=False)
    biased = compute_advantages(r, ids, "grpo", unbiased_std=False, eps=0.0)
    for _g, idx in members(ids).items():
        vals = [float(r[i]) for i in idx]
        m, s, ps = statistics.mean(vals), statistics.stdev(vals), statistics.pstdev(vals)
        for i in idx:
            assert adv[i].item() == pytest.approx((float(r[i]) - m) / (s + 1e-4), rel=1e-10)
            assert dr[i].item() == pytest.approx(float(r[i]) - m, rel=1e-10)
            assert nostd[i].item() == pytest.approx(float(r[i]) - m, rel=1e-10)
            assert biased[i].item() == pytest.approx((float(r[i]) - m) / ps, rel=1e-10)


def test_single_group_and_2d_forms():
    r = torch.randn(6, dtype=torch.float64)
    a1 = compute_advantages(r)
    a2 = compute_advantages(r.view(2, 3))
    m, s = r.mean(), r.std()
    torch.testing.assert_close(a1, (r - m) / (s + 1e-4))
    for g in range(2):
        row = r[3 * g: 3 * g + 3]
        torch.testing.assert_close(a2[g], (row - row.mean()) / (row.std() + 1e-4))
    assert a2.shape == (2, 3)


def test_rloo_leave_one_out():
    r, ids = grouped(3, 4)
    adv = compute_advantages(r, ids, "rloo")
    for idx in members(ids).values():
        for i in idx:
            others = [float(r[j]) for j in idx if j != i]
            assert adv[i].item() == pytest.approx(float(r[i]) - sum(others) / len(others), rel=1e-10)
    with pytest.raises(ValueError, match=">= 2"):
        compute_advantages(torch.randn(3), [0, 0, 1], "rloo")


def test_reinforce_pp_and_baselines():
    r, ids = grouped(3, 4)
    rv = [float(x) for x in r]
    pp = compute_advantages(r, ids, "reinforce++_response")  # the per-response form
    m, s = statistics.mean(rv), statistics.stdev(rv)
    for i, x in enumerate(rv):
        assert pp[i].item() == pytest.approx((x - m) / (s + 1e-4), rel=1e-10)
    ppb = compute_advantages(r, ids, "reinforce_pp_response", group_baseline=True)
    assert torch.equal(ppb, compute_advantages(r, ids, "reinforce_pp_response_baseline"))
    centred = [0.0] * len(rv)
    for idx in members(ids).values():
        gm = statistics.mean(rv[i] for i in idx)
        for i in idx:
            centred[i] = rv[i] - gm
    cm, cs = statistics.mean(centred), statistics.stdev(centred)
    for i, c in enumerate(centred):
        assert ppb[i].item() == pytest.approx((c - cm) / (cs + 1e-4), rel=1e-9, abs=1e-12)
    plain = compute_advantages(r, ids, "reinforce")
    for i, x in enumerate(rv):
        assert plain[i].item() == pytest.approx(x - m, rel=1e-10)


def test_opo_length_weighted_baseline():
    r, ids = grouped(3, 4)
    lengths = torch.randint(1, 50, (len(ids),))
    adv = compute_advantages(r, ids, "opo", lengths=lengths)
    for idx in members(ids).values():
        b = sum(int(lengths[i]) * float(r[i]) for i in idx) / sum(int(lengths[i]) for i in idx)
        for i in idx:
            assert adv[i].item() == pytest.approx(float(r[i]) - b, rel=1e-10)
    with pytest.raises(ValueError, match="lengths"):
        compute_advantages(r, ids, "opo")
    with pytest.raises(ValueError, match="shape mismatch"):
        compute_advantages(r, ids, "opo", lengths=[1, 2])


def brute_passk(rewards: list[float], k: int) -> list[float]:
    """Enumerate all k-subsets: subset reward = max; normalise by the mean/std of subset rewards;
    each response's advantage = mean over the subsets holding it."""
    n = len(rewards)
    subsets = list(itertools.combinations(range(n), k))
    sub_r = [max(rewards[i] for i in s) for s in subsets]
    mu = sum(sub_r) / len(sub_r)
    sd = math.sqrt(sum((x - mu) ** 2 for x in sub_r) / len(sub_r))
    out = []
    for i in range(n):
        vals = [(sub_r[j] - mu) / sd if sd > 0 else 0.0 for j, s in enumerate(subsets) if i in s]
        out.append(sum(vals) / len(vals))
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_passk_matches_subset_enumeration(k):
    n = 6
    for _ in range(5):
        r = (torch.rand(n) < torch.rand(())).double()
        got = passk_advantages(r, k)
        assert got.tolist() == pytest.approx(brute_passk(r.tolist(), k), abs=1e-12)
    r2 = (torch.rand(3 * n) < 0.5).double()
    ids = [i // n for i in range(3 * n)]
    got = compute_advantages(r2, ids, "pass@k", k=k)
    for g in range(3):
        assert got[g * n:(g + 1) * n].tolist() == pytest.approx(brute_passk(r2[g * n:(g + 1) * n].tolist(), k), abs=1e-12)


def test_passk_errors():
    with pytest.raises(ValueError, match="binary"):
        passk_advantages(torch.tensor([0.0, 0.5, 1.0]), 2)
    with pytest.raises(ValueError, match="k"):
        passk_advantages(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="k="):
        compute_advantages(torch.tensor([0.0, 1.0]), method="passk")


def test_gpg_alpha_correction():
    r = torch.randn(12, dtype=torch.float64)
    r[4:8] = 0.7  # group 1 has zero variance
    ids = [i // 4 for i in range(12)]
    adv = compute_advantages(r, ids, "gpg")
    alpha = 12 / 8
    for g in (0, 2):
        v = [float(x) for x in r[4 * g: 4 * g + 4]]
        m, s = statistics.mean(v), statistics.stdev(v)
        for j in range(4):
            assert adv[4 * g + j].item() == pytest.approx(alpha * (v[j] - m) / (s + 1e-4), rel=1e-10)
    assert adv[4:8].abs().max() == 0


def test_zero_variance_reporting_and_filtering():
    r = torch.rand(15, dtype=torch.float64)
    r[0:5] = 1.0
    r[10:15] = 0.0
    ids = [i // 5 for i in range(15)]
    drain()
    adv, info = compute_advantages(r, ids, "grpo", return_info=True)
    assert info["zero_variance_groups"] == 2 and info["num_groups"] == 3
    assert info["zero_variance_mask"].tolist() == [True] * 5 + [False] * 5 + [True] * 5
    assert adv[:5].abs().max() == 0 and adv[10:].abs().max() == 0
    m = {x.key: x.value for x in drain()}
    assert m["advantages/zero_variance_groups"] == 2
    assert m["advantages/zero_variance_frac"] == pytest.approx(2 / 3)
    assert filter_zero_variance(r, ids).tolist() == [False] * 5 + [True] * 5 + [False] * 5
    assert torch.equal(zero_variance_mask(r, ids), info["zero_variance_mask"])


def test_advantage_errors():
    with pytest.raises(ValueError, match="unknown advantage method 'ppo'"):
        compute_advantages(torch.randn(4), method="ppo")
    with pytest.raises(ValueError, match="group_ids has 3 entries but rewards has 4"):
        compute_advantages(torch.randn(4), [0, 0, 1])
    with pytest.raises(ValueError, match="NaN"):
        compute_advantages(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="empty"):
        compute_advantages(torch.tensor([]))


def test_reinforce_pp_whitens_over_tokens_like_verl_on_ragged_masks():
    """REINFORCE++ as OpenRLHF/verl compute it: each response's reward on each of its tokens, then
    masked whitening over all tokens (unbiased variance). Hand computation on a ragged [B, T] mask."""
    import math

    rng = random.Random()
    B, T = 8, 24
    rewards = [rng.uniform(-1, 2) for _ in range(B)]
    lengths = [rng.randint(1, T) for _ in range(B)]
    mask = [[1 if t < lengths[i] else 0 for t in range(T)] for i in range(B)]
    for i in range(B):  # a ragged mask with holes (tool tokens), not just right padding
        if lengths[i] > 3:
            mask[i][1] = 0
    counts = [sum(row) for row in mask]
    toks = [rewards[i] for i in range(B) for t in range(T) if mask[i][t]]
    mean = sum(toks) / len(toks)
    var = sum((x - mean) ** 2 for x in toks) / (len(toks) - 1)
    expected = [(rewards[i] - mean) / (math.sqrt(var) + 1e-4) for i in range(B)]
    adv = compute_advantages(torch.tensor(rewards, dtype=torch.float64), None, "reinforce_pp", lengths=counts)
    assert adv.tolist() == pytest.approx(expected, rel=1e-9)
    # the per-response form stays under its own name, and differs
    per_resp = compute_advantages(torch.tensor(rewards, dtype=torch.float64), None, "reinforce_pp_response")
    m, s = statistics.mean(rewards), statistics.stdev(rewards)
    assert per_resp.tolist() == pytest.approx([(r - m) / (s + 1e-4) for r in rewards], rel=1e-9)
    if len(set(counts)) > 1:
        assert not torch.allclose(adv, per_resp)
    # baseline variant: group mean removed first, then token whitening
    ids = [i // 4 for i in range(B)]
    a = [rewards[i] - statistics.mean(rewards[4 * (i // 4): 4 * (i // 4) + 4]) for i in range(B)]
    toks = [a[i] for i in range(B) for _ in range(counts[i])]
    mean = sum(toks) / len(toks)
    sd = math.sqrt(sum((x - mean) ** 2 for x in toks) / (len(toks) - 1))
    base = compute_advantages(torch.tensor(rewards, dtype=torch.float64), ids, "reinforce_pp_baseline", lengths=counts)
    assert base.tolist() == pytest.approx([(x - mean) / (sd + 1e-4) for x in a], rel=1e-9)
    with pytest.raises(ValueError, match="lengths"):
        compute_advantages(torch.tensor(rewards), None, "reinforce_pp")
