"""Outcome advantages for group-sampled RL: one reward per response -> one advantage per response.

Entry point: ``compute_advantages(rewards, group_ids=None, method="grpo", lengths=None, **kw)``.
``rewards`` is ``[N]`` (one group when ``group_ids`` is None) or ``[num_groups, group_size]``
(each row a group); ``group_ids`` is any ``[N]`` sequence of hashable ids (tensor or list).
The result has ``rewards``' shape. With ``return_info=True`` it returns ``(advantages, info)``
with ``info = {"zero_variance_groups": int, "num_groups": int, "zero_variance_mask": BoolTensor}``.
``advantages/zero_variance_groups`` (SUM) and ``advantages/zero_variance_frac`` are recorded.

Methods (per group g with rewards r_1..r_n, mean m_g, std s_g; batch mean M, std S):

* ``grpo``:  (r_i - m_g) / (s_g + eps)   (Shao et al. 2024; s_g unbiased by default, as TRL/
  torchforge; ``normalize_std=False`` gives Dr. GRPO)
* ``drgrpo``: r_i - m_g                  (Liu et al. 2025, "Understanding R1-Zero-Like Training")
* ``rloo``:  r_i - 1/(n-1) sum_{j!=i} r_j  (Ahmadian et al. 2024; leave-one-out; needs n >= 2)
* ``reinforce_pp``: REINFORCE++ (Hu 2025) as its reference implementations (OpenRLHF, verl's
  ``masked_whiten``) compute it: every token of response i carries a_i = r_i, and the batch is
  whitened over TOKENS, so a longer response weighs more. With l_i = ``lengths`` (response token
  counts, required), L = sum l_i: M_tok = sum l_i a_i / L, V_tok = sum l_i (a_i - M_tok)^2 / (L - 1),
  advantage (a_i - M_tok) / (sqrt(V_tok) + eps). ``group_baseline=True`` (REINFORCE++-baseline,
  alias ``reinforce_pp_baseline``): a_i = r_i - m_g first.
* ``reinforce_pp_response``: the same over responses, each weighing 1: (a_i - mean a) / (std a + eps)
  (forge's earlier ``reinforce_pp``; ``group_baseline`` as above)
* ``opo``:   r_i - sum_j l_j r_j / sum_j l_j   (Hao et al. 2025, "On-Policy RL with Optimal reward
  Baseline"; ``lengths`` = response lengths l_i)
* ``passk``: the analytic pass@k advantage of Chen et al. 2025, "Pass@k Training for Adaptively
  Balancing Exploration and Exploitation" (arXiv:2508.10751), binary rewards, see :func:`passk_advantages`
* ``reinforce``: r_i - M                  (plain REINFORCE with a batch-mean baseline)
* ``gpg``: alpha * (r_i - m_g) / (s_g + eps), alpha = N / (N - N_zero_var)   (Chu et al. 2025, GPG;
  ``normalize_std=False`` drops the std)

Groups whose rewards are all equal (zero variance) carry no learning signal for the group
methods; :func:`filter_zero_variance` drops them (DAPO dynamic sampling).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from forge.observability import Reduce, record_metric

METHODS = ("grpo", "drgrpo", "rloo", "reinforce_pp", "reinforce_pp_response", "opo", "passk", "reinforce", "gpg")
# methods that read `lengths` (response token counts)
USES_LENGTHS = ("reinforce_pp", "opo")
_ALIASES = {
    "grpo": "grpo", "drgrpo": "drgrpo", "dr_grpo": "drgrpo", "dr.grpo": "drgrpo", "rloo": "rloo",
    "reinforce_pp": "reinforce_pp", "reinforce++": "reinforce_pp", "reinforcepp": "reinforce_pp",
    "reinforce_plus_plus": "reinforce_pp", "reinforce_pp_baseline": "reinforce_pp_baseline",
    "reinforce++_baseline": "reinforce_pp_baseline", "reinforce_pp_response": "reinforce_pp_response",
    "reinforce++_response": "reinforce_pp_response", "reinforce_pp_response_baseline": "reinforce_pp_response_baseline",
    "opo": "opo", "passk": "passk",
    "pass@k": "passk", "grpo_passk": "passk", "reinforce": "reinforce", "gpg": "gpg",
}


# ----------------------------------------------------------------------------- grouping


def _group_index(n: int, group_ids: Tensor | Sequence[Hashable] | None) -> Tensor:
    """Dense group index ``[n]`` in 0..G-1 (order of first appearance)."""
    if group_ids is None:
        return torch.zeros(n, dtype=torch.long)
    ids = group_ids.tolist() if isinstance(group_ids, Tensor) else list(group_ids)
    if len(ids) != n:
        raise ValueError(f"shape mismatch: group_ids has {len(ids)} entries but rewards has {n}")
    seen: dict[Hashable, int] = {}
    return torch.tensor([seen.setdefault(g, len(seen)) for g in ids], dtype=torch.long)


def _flatten(rewards: Tensor | Sequence[float], group_ids: Any) -> tuple[Tensor, Tensor, torch.Size]:
    r = torch.as_tensor(rewards)
    if not r.is_floating_point():
        r = r.to(torch.float32)
    if r.numel() == 0:
        raise ValueError("rewards is empty")
    if not torch.isfinite(r).all():
        raise ValueError("rewards has NaN or inf")
    if r.dim() == 2:
        if group_ids is not None:
            raise ValueError("rewards [num_groups, group_size] already define the groups; drop group_ids")
        idx = torch.arange(r.shape[0], device=r.device).repeat_interleave(r.shape[1])
        return r.reshape(-1), idx, r.shape
    if r.dim() != 1:
        raise ValueError(f"rewards must be [N] or [num_groups, group_size], got shape {tuple(r.shape)}")
    return r, _group_index(r.numel(), group_ids).to(r.device), r.shape


def _group_stats(r: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample group mean, unbiased group std (0 for singleton groups), group size, zero-var."""
    g = int(idx.max()) + 1
    z = r.new_zeros(g)
    cnt = z.index_add(0, idx, torch.ones_like(r))
    mean = z.index_add(0, idx, r) / cnt
    dev2 = z.index_add(0, idx, (r - mean[idx]) ** 2)
    std = torch.sqrt(dev2 / (cnt - 1).clamp(min=1))
    rmax = r.new_full((g,), -math.inf).scatter_reduce(0, idx, r, "amax")
    rmin = r.new_full((g,), math.inf).scatter_reduce(0, idx, r, "amin")
    zero_var = rmax == rmin
    return mean[idx], std[idx], cnt[idx], zero_var


def zero_variance_mask(rewards: Tensor | Sequence[float], group_ids: Any = None) -> Tensor:
    """Bool ``[N]`` (or rewards' 2-D shape): True for samples whose group's rewards are all equal."""
    r, idx, shape = _flatten(rewards, group_ids)
    return _group_stats(r, idx)[3][idx].reshape(shape)


def filter_zero_variance(rewards: Tensor | Sequence[float], group_ids: Any = None) -> Tensor:
    """DAPO dynamic sampling (Yu et al. 2025): bool keep-mask, False for samples of groups whose
    rewards are all equal (their group-relative advantage is 0: no gradient, only dilution)."""
    return ~zero_variance_mask(rewards, group_ids)


# ----------------------------------------------------------------------------- pass@k


def passk_advantages(rewards: Tensor, k: int) -> Tensor:
    """Analytic pass@k advantages for one group of binary rewards (Chen et al. 2025).

    Pass@k training scores each k-subset of the group's n responses by its max reward and
    gives every response the mean (over the subsets holding it) of the subset's normalised
    advantage. With n_neg incorrect responses, in closed form:

        R     = 1 - C(n_neg, k) / C(n, k)             (mean subset reward = pass@k estimate)
        sigma = sqrt(R (1 - R))                       (std of a Bernoulli(R) subset reward)
        A_pos = (1 - R) / sigma                       (every subset holding a correct one scores 1)
        A_neg = (1 - R - C(n_neg - 1, k - 1) / C(n - 1, k - 1)) / sigma
                 (a subset holding an incorrect response scores 0 only when its other k-1
                  members are all incorrect: probability C(n_neg-1, k-1) / C(n-1, k-1))

    sigma = 0 (all equal) gives advantages 0. ``k == 1`` reduces to GRPO with biased std.
    """
    n = rewards.numel()
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= group size, got k={k}, group size {n}")
    if not bool(((rewards == 0) | (rewards == 1)).all()):
        raise ValueError("pass@k advantages need binary 0/1 rewards")
    n_neg = int((rewards == 0).sum())
    r_mean = 1 - math.comb(n_neg, k) / math.comb(n, k)
    sigma = math.sqrt(r_mean * (1 - r_mean))
    if sigma == 0:
        return torch.zeros_like(rewards)
    a_pos = (1 - r_mean) / sigma
    p_zero = math.comb(n_neg - 1, k - 1) / math.comb(n - 1, k - 1) if n_neg >= 1 else 0.0
    a_neg = (1 - r_mean - p_zero) / sigma
    return torch.where(rewards == 1, torch.full_like(rewards, a_pos), torch.full_like(rewards, a_neg))


# ----------------------------------------------------------------------------- entry point


def _lengths(lengths: Tensor | Sequence[int], r: Tensor, method: str) -> Tensor:
    l = torch.as_tensor(lengths, dtype=r.dtype).reshape(-1)
    if l.numel() != r.numel():
        raise ValueError(f"shape mismatch: lengths has {l.numel()} entries but rewards has {r.numel()}")
    if bool((l <= 0).any()):
        raise ValueError(f"{method} lengths must be > 0")
    return l.to(r.device)


def compute_advantages(
    rewards: Tensor | Sequence[float],
    group_ids: Tensor | Sequence[Hashable] | None = None,
    method: str = "grpo",
    lengths: Tensor | Sequence[int] | None = None,
    *,
    eps: float = 1e-4,
    normalize_std: bool = True,
    unbiased_std: bool = True,
    group_baseline: bool = False,
    k: int | None = None,
    return_info: bool = False,
    log_metrics: bool = True,
) -> Tensor | tuple[Tensor, dict[str, Any]]:
    """Advantages for ``rewards`` by ``method`` (see the module docstring for the formulas)."""
    key = _ALIASES.get(method.lower().replace("-", "_")) if isinstance(method, str) else None
    if key is None:
        raise ValueError(f"unknown advantage method {method!r}; valid: {', '.join(METHODS)}")
    if key in ("reinforce_pp_baseline", "reinforce_pp_response_baseline"):
        key, group_baseline = key.removesuffix("_baseline"), True
    r, idx, shape = _flatten(rewards, group_ids)
    mean, std, cnt, zero_var_g = _group_stats(r, idx)
    if not unbiased_std:
        std = std * torch.sqrt((cnt - 1).clamp(min=1) / cnt)
    zv = zero_var_g[idx]

    if key in ("grpo", "gpg"):
        adv = r - mean
        if normalize_std:
            adv = adv / (std + eps)
        adv = torch.where(zv, torch.zeros_like(adv), adv)  # singleton/equal groups: exactly 0
        if key == "gpg":
            n_valid = int((~zv).sum())
            adv = adv * (r.numel() / n_valid if n_valid else 0.0)
    elif key == "drgrpo":
        adv = torch.where(zv, torch.zeros_like(r), r - mean)
    elif key == "rloo":
        if bool((cnt < 2).any()):
            raise ValueError("rloo needs every group to have >= 2 samples (leave-one-out baseline)")
        adv = (r - mean) * cnt / (cnt - 1)
    elif key == "reinforce_pp":
        if lengths is None:
            raise ValueError("reinforce_pp whitens over tokens and needs lengths= (response token counts); "
                             "reinforce_pp_response normalises over responses instead")
        a = r - mean if group_baseline else r
        w = _lengths(lengths, r, "reinforce_pp")
        n_tok = w.sum()
        m_tok = (w * a).sum() / n_tok
        var = (w * (a - m_tok) ** 2).sum() / (n_tok - 1).clamp(min=1)  # unbiased, as verl's masked_var
        adv = (a - m_tok) / (var.sqrt() + eps)
    elif key == "reinforce_pp_response":
        a = r - mean if group_baseline else r
        s = a.std() if a.numel() > 1 else torch.zeros((), dtype=a.dtype)
        adv = (a - a.mean()) / (s + eps)
    elif key == "reinforce":
        adv = r - r.mean()
    elif key == "opo":
        if lengths is None:
            raise ValueError("opo needs lengths= (response lengths, one per reward)")
        l = _lengths(lengths, r, "opo")
        g = int(idx.max()) + 1
        num = r.new_zeros(g).index_add(0, idx, l * r)
        den = r.new_zeros(g).index_add(0, idx, l)
        adv = r - (num / den)[idx]
    else:  # passk
        if k is None:
            raise ValueError("passk needs k= (the k of pass@k)")
        adv = torch.empty_like(r)
        for g in range(int(idx.max()) + 1):
            sel = idx == g
            adv[sel] = passk_advantages(r[sel], k)

    n_groups = int(idx.max()) + 1
    n_zero = int(zero_var_g.sum())
    if log_metrics:
        record_metric("advantages/zero_variance_groups", n_zero, Reduce.SUM)
        record_metric("advantages/zero_variance_frac", n_zero / n_groups, Reduce.MEAN)
        record_metric("advantages/mean", adv.mean(), Reduce.MEAN)
        record_metric("advantages/std", adv.std() if adv.numel() > 1 else 0.0, Reduce.MEAN)
    adv = adv.reshape(shape)
    if return_info:
        return adv, {"zero_variance_groups": n_zero, "num_groups": n_groups, "zero_variance_mask": zv.reshape(shape)}
    return adv
