"""Shared pieces of every policy loss: input checks, aggregation, KL estimators, truncated IS.

Conventions (all tensors ``[batch, response_len]`` unless said otherwise):

* ``padding_mask`` is 1 where a token is trained on, 0 on padding (bool or 0/1 numbers).
  Padding positions may hold anything (garbage, ``-inf``): they are replaced by 0 before any
  arithmetic, so they never change the value or the gradient.
* A fully-masked sequence contributes nothing; a fully-masked batch gives loss 0 (never NaN).
* The *behaviour* logprobs a ratio ``r = exp(logp - behaviour)`` is taken against are
  ``old_logprobs`` when given; otherwise ``generator_logprobs`` when given and no ``tis_cap`` is
  set; otherwise the detached current ``logprobs`` (ratio 1 with the correct gradient, as in
  torchforge's ``SimpleGRPOLoss``). With ``tis_cap`` and no ``old_logprobs``, the detached
  trainer logprobs stand in for the old policy (forge updates once per batch, so old == current
  at the first micro-step) and the train/inference mismatch is carried by the TIS weight alone;
  taking the ratio against the generator as well would correct for the mismatch twice.
* Truncated importance sampling (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings
  You Off-Policy RL Training"): each token's policy loss is multiplied by the detached weight
  ``min(exp(old_or_trainer - generator_logprobs), tis_cap)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from forge.observability import Reduce, record_metric

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
_KL_ALIASES = {"k1": "k1", "kl": "k1", "k2": "k2", "mse": "k2", "k3": "k3", "low_var": "k3", "low_var_kl": "k3",
               "abs": "abs"}
METRIC_PREFIX = "loss"


# ----------------------------------------------------------------------------- aggregation


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (0 when there are none)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def aggregate(loss_mat: Tensor, mask: Tensor, mode: str = "token-mean", max_len: int | None = None) -> Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar.

    With ``L = loss_mat * mask``, ``n_i = sum_t mask_it`` and ``S`` the sequences with n_i > 0:

    * ``token-mean``:              sum_it L_it / sum_i n_i  (DAPO)
    * ``seq-mean-token-mean``:     1/|S| sum_{i in S} (sum_t L_it / n_i)  (GRPO paper)
    * ``seq-mean-token-sum``:      1/|S| sum_{i in S} sum_t L_it
    * ``seq-mean-token-sum-norm``: 1/|S| sum_{i in S} sum_t L_it / max_len  (Dr. GRPO, Liu et al.
      2025: a constant normaliser, no length bias). ``max_len`` defaults to the padded width T,
      which makes the value depend on padding: pass the generation limit for a constant.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; valid: {', '.join(AGG_MODES)}")
    mask = mask.to(loss_mat.dtype)
    masked = loss_mat * mask
    if mode == "token-mean":
        return masked.sum() / mask.sum().clamp(min=1)
    n_tok = mask.sum(dim=1)
    n_seq = (n_tok > 0).sum().clamp(min=1)
    seq_sum = masked.sum(dim=1)
    if mode == "seq-mean-token-mean":
        return (seq_sum / n_tok.clamp(min=1)).sum() / n_seq
    if mode == "seq-mean-token-sum":
        return seq_sum.sum() / n_seq
    norm = loss_mat.shape[1] if max_len is None else max_len
    return seq_sum.sum() / (n_seq * norm)


# ----------------------------------------------------------------------------- KL


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL
    divergence", 2020). With ``log r = ref_logprobs - logprobs``:

    * ``k1`` = -log r                 (unbiased, high variance, can be negative)
    * ``k2`` = (log r)^2 / 2          (biased, low variance)
    * ``k3`` = (r - 1) - log r        (unbiased, low variance, >= 0; GRPO's; alias ``low_var``)
    * ``abs`` = |log r|               (biased, >= 0; verl's ``abs`` kl_penalty)
    """
    est = _KL_ALIASES.get(estimator.lower()) if isinstance(estimator, str) else None
    if est is None:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(_KL_ALIASES)}")
    log_r = ref_logprobs - logprobs
    if est == "k1":
        return -log_r
    if est == "k2":
        return 0.5 * log_r.square()
    if est == "abs":
        return log_r.abs()
    return torch.exp(log_r) - 1 - log_r


# ----------------------------------------------------------------------------- inputs


@dataclass
class LossInputs:
    """Validated inputs: padding replaced by 0, advantages broadcast to ``[B, T]``."""

    logprobs: Tensor
    mask: Tensor  # float, same dtype as logprobs
    advantages: Tensor  # [B, T]
    seq_advantages: Tensor  # [B]: the given [B] advantages, or the masked per-sequence mean
    ref_logprobs: Tensor | None
    behaviour: Tensor | None  # detached behaviour-policy logprobs, None -> detached current
    generator_logprobs: Tensor | None
    old_logprobs: Tensor | None
    entropy: Tensor | None

    def log_ratio(self) -> Tensor:
        """``logp - behaviour`` (0 with gradient d logp when there is no behaviour policy)."""
        base = self.logprobs.detach() if self.behaviour is None else self.behaviour
        return self.logprobs - base


def _check_shape(name: str, x: Tensor | None, ref_shape: torch.Size) -> None:
    if x is None:
        return
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.shape != ref_shape:
        raise ValueError(f"shape mismatch: {name} has shape {tuple(x.shape)} but logprobs has {tuple(ref_shape)}")


def prepare_inputs(
    logprobs: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    padding_mask: Tensor,
    *,
    generator_logprobs: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    use_generator_as_behaviour: bool = True,
) -> LossInputs:
    """Check shapes/values (one host sync in all) and zero the padding. Raises ValueError."""
    if not isinstance(logprobs, Tensor) or logprobs.dim() != 2:
        shape = tuple(logprobs.shape) if isinstance(logprobs, Tensor) else type(logprobs).__name__
        raise ValueError(f"logprobs must be a [batch, response_len] tensor, got {shape}")
    if not logprobs.is_floating_point():
        raise ValueError(f"logprobs must be floating point, got {logprobs.dtype}")
    shape = logprobs.shape
    _check_shape("padding_mask", padding_mask, shape)
    for name, x in (("ref_logprobs", ref_logprobs), ("generator_logprobs", generator_logprobs),
                    ("old_logprobs", old_logprobs), ("entropy", entropy)):
        _check_shape(name, x, shape)
    if not isinstance(advantages, Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    if advantages.dim() == 2 and advantages.shape[1] == 1 and shape[1] != 1:
        advantages = advantages[:, 0]
    if advantages.shape not in (shape, shape[:1]):
        raise ValueError(
            f"shape mismatch: advantages has shape {tuple(advantages.shape)} but must be "
            f"[batch]={tuple(shape[:1])} or [batch, response_len]={tuple(shape)} like logprobs"
        )

    mbool = padding_mask.bool()
    adv_full = advantages.to(logprobs.dtype)
    if adv_full.dim() == 1:
        adv_full = adv_full[:, None].expand(shape)
    named = [("logprobs", logprobs), ("advantages", adv_full), ("ref_logprobs", ref_logprobs),
             ("generator_logprobs", generator_logprobs), ("old_logprobs", old_logprobs), ("entropy", entropy)]
    present = [(n, x) for n, x in named if x is not None]
    flags = [~((padding_mask == 0) | (padding_mask == 1)).all()]
    flags += [(~torch.isfinite(x.detach()) & mbool).any() for _, x in present]
    bad = torch.stack(flags).tolist()
    if bad[0]:
        vals = torch.unique(padding_mask.detach()).flatten()[:6].tolist()
        raise ValueError(f"padding_mask must hold only 0/1 (or bool), found values like {vals}")
    for (name, _), b in zip(present, bad[1:]):
        if b:
            raise ValueError(f"{name} has NaN or inf at unmasked positions")

    def clean(x: Tensor | None) -> Tensor | None:
        return None if x is None else torch.where(mbool, x, torch.zeros((), dtype=x.dtype, device=x.device))

    mask = mbool.to(logprobs.dtype)
    adv_full = clean(adv_full)
    if advantages.dim() == 1:
        seq_adv = advantages.to(logprobs.dtype)
    else:
        seq_adv = adv_full.sum(1) / mask.sum(1).clamp(min=1)
    old = clean(old_logprobs)
    gen = clean(generator_logprobs)
    behaviour = old if old is not None else (gen if use_generator_as_behaviour else None)
    return LossInputs(
        logprobs=clean(logprobs),
        mask=mask,
        advantages=adv_full,
        seq_advantages=seq_adv,
        ref_logprobs=clean(ref_logprobs),
        behaviour=None if behaviour is None else behaviour.detach(),
        generator_logprobs=None if gen is None else gen.detach(),
        old_logprobs=None if old is None else old.detach(),
        entropy=clean(entropy),
    )


def tis_weights(inputs: LossInputs, cap: float) -> Tensor:
    """Detached truncated-IS weights ``min(exp(old_or_trainer - generator), cap)`` ``[B, T]``."""
    if inputs.generator_logprobs is None:
        raise ValueError("tis_cap needs generator_logprobs (the inference engine's logprobs)")
    num = inputs.old_logprobs if inputs.old_logprobs is not None else inputs.logprobs.detach()
    return torch.exp(num - inputs.generator_logprobs).clamp(max=cap) * inputs.mask


# ----------------------------------------------------------------------------- base class


class PolicyLoss(nn.Module):
    """Base of forge's policy losses. Subclasses implement :meth:`policy_loss`.

    ``forward`` computes ``aggregate(pg_it * w_it + beta * kl_it) - entropy_coef * aggregate(H)``
    where ``pg`` is the subclass's per-token policy loss, ``w`` the truncated-IS weight (1 when
    ``tis_cap`` is None), ``kl`` the chosen estimator of KL(pi || pi_ref) and ``H`` the entropy.

    Args:
        beta: KL-to-reference coefficient (0: no KL and ``ref_logprobs`` may be None).
        kl_estimator: "k1", "k2" or "k3" (low-variance; default).
        agg: aggregation mode, see :func:`aggregate`.
        max_len: Dr. GRPO constant for ``seq-mean-token-sum-norm``.
        tis_cap: cap of the truncated importance weight against generator logprobs (None: off).
        entropy_coef: entropy bonus coefficient (needs ``entropy=`` in forward).
        log_metrics: record diagnostics under ``loss/`` with ``record_metric``.
    """

    default_agg: str = "token-mean"
    needs_old_logprobs: bool = False

    def __init__(
        self,
        *,
        beta: float = 0.0,
        kl_estimator: str = "k3",
        agg: str | None = None,
        max_len: int | None = None,
        tis_cap: float | None = None,
        entropy_coef: float = 0.0,
        log_metrics: bool = True,
    ) -> None:
        super().__init__()
        agg = self.default_agg if agg is None else agg
        if agg not in AGG_MODES:
            raise ValueError(f"unknown aggregation mode {agg!r}; valid: {', '.join(AGG_MODES)}")
        if kl_estimator.lower() not in _KL_ALIASES:
            raise ValueError(f"unknown KL estimator {kl_estimator!r}; valid: {', '.join(_KL_ALIASES)}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if tis_cap is not None and tis_cap <= 0:
            raise ValueError(f"tis_cap must be > 0 or None, got {tis_cap}")
        if max_len is not None and max_len <= 0:
            raise ValueError(f"max_len must be > 0, got {max_len}")
        self.beta, self.kl_estimator, self.agg, self.max_len = float(beta), kl_estimator, agg, max_len
        self.tis_cap, self.entropy_coef, self.log_metrics = tis_cap, float(entropy_coef), log_metrics

    @property
    def needs_ref(self) -> bool:
        return self.beta > 0

    def policy_loss(self, x: LossInputs, stats: dict[str, Tensor]) -> Tensor:
        """Per-token policy loss ``[B, T]`` (padding may hold anything; it is masked later).

        Put detached 0-d diagnostic tensors into ``stats`` (key without the ``loss/`` prefix).
        """
        raise NotImplementedError

    def forward(
        self,
        logprobs: Tensor,
        ref_logprobs: Tensor | None,
        advantages: Tensor,
        padding_mask: Tensor,
        *,
        generator_logprobs: Tensor | None = None,
        old_logprobs: Tensor | None = None,
        entropy: Tensor | None = None,
    ) -> Tensor:
        if self.needs_ref and ref_logprobs is None:
            raise ValueError(f"{type(self).__name__}(beta={self.beta}) needs ref_logprobs; pass them or set beta=0")
        if self.entropy_coef and entropy is None:
            raise ValueError(f"{type(self).__name__}(entropy_coef={self.entropy_coef}) needs entropy=")
        x = prepare_inputs(
            logprobs, ref_logprobs, advantages, padding_mask,
            generator_logprobs=generator_logprobs, old_logprobs=old_logprobs, entropy=entropy,
            use_generator_as_behaviour=self.tis_cap is None,
        )
        stats: dict[str, Tensor] = {}
        per_token = self.policy_loss(x, stats)
        if self.tis_cap is not None:
            w = tis_weights(x, self.tis_cap)
            per_token = per_token * w
            stats["tis_weight_mean"] = masked_mean(w, x.mask)
            stats["tis_clip_frac"] = masked_mean((w >= self.tis_cap).to(w.dtype), x.mask)
        pg = aggregate(per_token, x.mask, self.agg, self.max_len)
        loss = pg
        if self.beta > 0:
            kl = kl_penalty(x.logprobs, x.ref_logprobs, self.kl_estimator)
            loss = loss + self.beta * aggregate(kl, x.mask, self.agg, self.max_len)
        if self.entropy_coef:
            loss = loss - self.entropy_coef * aggregate(x.entropy, x.mask, self.agg, self.max_len)
        if self.log_metrics:
            self._record(x, stats, pg, loss)
        return loss

    @torch.no_grad()
    def _record(self, x: LossInputs, stats: dict[str, Tensor], pg: Tensor, loss: Tensor) -> None:
        m = x.mask
        log_r = x.log_ratio().detach()
        stats.setdefault("ratio_mean", masked_mean(torch.exp(log_r), m))
        # KL(behaviour || pi) from behaviour samples, k3 with r = pi / behaviour.
        stats.setdefault("approx_kl", masked_mean(torch.exp(log_r) - 1 - log_r, m))
        if x.ref_logprobs is not None:
            stats["kl_ref"] = masked_mean(kl_penalty(x.logprobs.detach(), x.ref_logprobs, "k3"), m)
        if x.generator_logprobs is not None:
            d = x.logprobs.detach() - x.generator_logprobs
            stats["mismatch_kl"] = masked_mean(torch.exp(d) - 1 - d, m)
        if x.entropy is not None:
            stats["entropy"] = masked_mean(x.entropy.detach(), m)
        stats["pg_loss"] = pg.detach()
        stats["total"] = loss.detach()
        keys = list(stats)
        values = torch.stack([stats[k].detach().float().reshape(()) for k in keys]).tolist()
        for k, v in zip(keys, values):
            record_metric(f"{METRIC_PREFIX}/{k}", v, Reduce.MEAN)


def ppo_clip_stats(ratio: Tensor, adv: Tensor, mask: Tensor, low: float, high: float) -> dict[str, Tensor]:
    """Fractions of trained tokens whose gradient the PPO clip removes: ``clip_frac_low``
    (r < low with A < 0) and ``clip_frac_high`` (r > high with A > 0)."""
    with torch.no_grad():
        lo = ((ratio < low) & (adv < 0)).to(mask.dtype)
        hi = ((ratio > high) & (adv > 0)).to(mask.dtype)
        return {"clip_frac_low": masked_mean(lo, mask), "clip_frac_high": masked_mean(hi, mask)}
