"""Batched sampling on device: temperature, top-k, top-p, min-p, per-request seeds.

One uniform number per row and inverse-CDF sampling (searchsorted over the cumulative
probabilities). Rows with a seed take their uniform from a counter-based hash of
(seed, sample index, token index), so a seeded sample is reproducible whatever else is in
the batch; unseeded rows draw from the engine's generator (the engine gives every request a
seed: its own, or one derived from the engine seed and the request's number). No per-row
Python on the device.

Fast path (CUDA with Triton; `fast=True` also under TRITON_INTERPRET=1): when no row of the
batch uses top-k, top-p, min-p or truncated logprobs, `forge.engine.kernels.sample` draws the
same inverse-CDF sample in two kernels that read the logits once, in their own dtype (no
float32 copy, no sort, no full-vocabulary cumulative sum). Otherwise the torch path below.

Logprobs: see `SamplingParams` (temperature-scaled full-vocabulary log-softmax at the sampled
token by default; greedy rows: plain log-softmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forge.engine import kernels as K

_MASK32 = 0xFFFFFFFF


def _seed63(s) -> int:
    return -1 if s is None else int(s) & ((1 << 63) - 1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (murmur3 finaliser) on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32  # constants < 2**31 keep the int64 product from overflowing
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def counter_uniform(seed: torch.Tensor, stream: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """Uniform(0, 1) float64 from three int64 tensors (same shape): reproducible, batch-independent."""
    h = _mix32((seed & _MASK32) ^ 0x3C6EF372)
    h = _mix32(h ^ ((seed >> 32) & _MASK32))
    h = _mix32(h ^ (stream & _MASK32))
    hi = _mix32(h ^ (counter & _MASK32))
    lo = _mix32(hi ^ 0x9E3779B9)
    # 53 random bits -> (0, 1)
    bits = ((hi >> 6) << 27) | (lo >> 5)
    return (bits.double() + 0.5) / float(1 << 53)


@dataclass
class SamplingBatch:
    """Per-row sampling parameters, as device tensors, plus host-side flags that skip unused work."""

    temperature: torch.Tensor  # [B] float32; 0 = greedy
    top_k: torch.Tensor | None  # [B] int64; 0 = off (None: no row uses it)
    top_p: torch.Tensor | None  # [B] float32
    min_p: torch.Tensor | None  # [B] float32
    seed: torch.Tensor  # [B] int64; -1 = none
    stream: torch.Tensor  # [B] int64: sample index within its request
    counter: torch.Tensor  # [B] int64: number of tokens this sample generated so far
    any_greedy: bool
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_seeded: bool
    truncated_logprobs: torch.Tensor | None  # [B] bool, or None if no row wants it
    all_seeded: bool = False

    @property
    def fast_ok(self) -> bool:
        """No row needs the sorted / filtered distribution (the fused kernels sample the rest)."""
        return not (self.any_top_k or self.any_top_p or self.any_min_p or self.truncated_logprobs is not None)

    @classmethod
    def build(cls, rows: list[tuple], device: torch.device, state: tuple | None = None) -> SamplingBatch:
        """rows: (temperature, top_k, top_p, min_p, seed or None, stream, counter, truncated_logprobs).
        `state`: device tensors (temperature, seed, stream, counter) already holding these rows
        (the fused decode state, which moves `counter` on by itself); used instead of new copies."""
        t, k, p, mp, seed, stream, ctr, trunc = zip(*rows)
        seed = [_seed63(s) for s in seed]
        f = lambda x, dt: torch.tensor(x, dtype=dt).to(device, non_blocking=True)  # noqa: E731
        any_k, any_p, any_mp = any(x > 0 for x in k), any(x < 1.0 for x in p), any(x > 0 for x in mp)
        if state is not None:
            temperature, seed_t, stream_t, counter_t = state
        else:
            temperature, seed_t = f(t, torch.float32), f(seed, torch.int64)
            stream_t, counter_t = f(stream, torch.int64), f(ctr, torch.int64)
        return cls(
            temperature=temperature, top_k=f(k, torch.int64) if any_k else None,
            top_p=f(p, torch.float32) if any_p else None, min_p=f(mp, torch.float32) if any_mp else None,
            seed=seed_t, stream=stream_t, counter=counter_t,
            any_greedy=any(x == 0 for x in t), all_greedy=all(x == 0 for x in t),
            any_top_k=any_k, any_top_p=any_p, any_min_p=any_mp, any_seeded=any(s >= 0 for s in seed),
            truncated_logprobs=f(trunc, torch.bool) if any(trunc) else None,
            all_seeded=all(s >= 0 for s in seed),
        )


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0, fast: bool | None = None):
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.fast = K.HAS_TRITON and (device.type == "cuda" if fast is None else bool(fast))

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, sb: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, V] -> (tokens [B] int64, logprobs [B] float32)."""
        if self.fast and sb.fast_ok:
            u = None
            if not sb.all_seeded:
                u = torch.rand(logits.shape[0], generator=self.generator, device=logits.device, dtype=torch.float64)
            return K.sample(logits, sb.temperature, sb.seed, sb.stream, sb.counter, u=u, any_greedy=sb.any_greedy)
        x = logits.float()
        if sb.all_greedy:
            tokens = x.argmax(-1)
            return tokens, _gather(x, tokens) - torch.logsumexp(x, -1)
        greedy_tokens = x.argmax(-1) if sb.any_greedy else None
        raw_lse = torch.logsumexp(x, -1) if sb.any_greedy else None
        temp = torch.where(sb.temperature > 0, sb.temperature, torch.ones_like(sb.temperature))
        x = x / temp.unsqueeze(1)
        lse = torch.logsumexp(x, -1)
        probs = torch.exp(x - lse.unsqueeze(1))  # softmax(logits / T), full vocabulary
        u = torch.rand(probs.shape[0], generator=self.generator, device=probs.device, dtype=torch.float64)
        if sb.any_seeded:
            u = torch.where(sb.seed >= 0, counter_uniform(sb.seed, sb.stream, sb.counter), u)
        trunc_logp = None
        if sb.any_top_k or sb.any_top_p:
            # sort once; both filters keep a prefix of the sorted order, so sample in sorted space
            sp, idx = probs.sort(-1, descending=True)
            keep = torch.ones_like(sp, dtype=torch.bool)
            if sb.any_top_k:
                rank = torch.arange(sp.shape[1], device=sp.device)
                k = torch.where(sb.top_k > 0, sb.top_k, sp.shape[1])
                keep &= rank.unsqueeze(0) < k.unsqueeze(1)
            if sb.any_top_p:
                before = sp.cumsum(-1) - sp  # mass strictly before each token
                keep &= before < sb.top_p.unsqueeze(1)
            if sb.any_min_p:
                keep &= sp >= (sb.min_p * sp[:, 0]).unsqueeze(1)
            keep[:, 0] = True
            sp = sp * keep
            pos = _inverse_cdf(sp, u)
            tokens = idx.gather(1, pos.unsqueeze(1)).squeeze(1)
            if sb.truncated_logprobs is not None:
                trunc_logp = (_gather(sp, pos) / sp.sum(-1)).log()
        else:
            if sb.any_min_p:
                probs = probs * (probs >= (sb.min_p * probs.amax(-1)).unsqueeze(1))
            tokens = _inverse_cdf(probs, u)
            if sb.truncated_logprobs is not None:
                trunc_logp = (_gather(probs, tokens) / probs.sum(-1)).log()
        out = _gather(x, tokens) - lse
        if trunc_logp is not None:
            out = torch.where(sb.truncated_logprobs, trunc_logp, out)
        if greedy_tokens is not None:
            greedy = sb.temperature == 0
            tokens = torch.where(greedy, greedy_tokens, tokens)
            out = torch.where(greedy, _gather(logits.float(), greedy_tokens) - raw_lse, out)
        return tokens, out


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx.unsqueeze(1)).squeeze(1)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index i with cdf[i-1] <= u * total < cdf[i] over unnormalised non-negative weights [B, V].

    The target is kept strictly below the total, so the returned token always has weight > 0
    (cdf strictly increases there). Small vocabularies cumulate in float64 for exactness.
    """
    cdf = weights.double().cumsum(-1) if weights.shape[1] <= 4096 else weights.cumsum(-1)
    total = cdf[:, -1:]
    target = (u.unsqueeze(1) * total.double()).to(cdf.dtype)
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=weights.shape[1] - 1)
