"""The per-micro-batch math shared by the RL trainer, the reference model and SFT.

`LogprobModel` wraps a `CausalLM` so that the whole token -> logprob path runs inside one
module forward: under FSDP2 that module is the root unit, so `lm_head` (tied or not) is
gathered for exactly that forward and its gradient is reduce-scattered like any other.

Gradient accumulation. A loss aggregates over the batch (`agg`, see forge.losses.common):
`token-mean` divides by the number of trained tokens of the batch, the `seq-mean-*` modes by
the number of sequences with a trained token. Micro-batch k computes the same loss on its own
rows, L_k = S_k / n_k, so the batch loss is sum_k L_k * n_k / n, with n counted over the
*whole* batch (all micro-batches, all data-parallel ranks). The trainer backpropagates
L_k * n_k / n * world_size (FSDP averages gradients over ranks), which gives exactly the
gradient of the full-batch loss. This is exact for every loss whose per-token/per-sequence
terms do not depend on other rows (all of forge's except the covariance-selection ones,
clip_cov/kl_cov, whose top-k token choice is then made per micro-batch).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from forge.models.decoder import CausalLM
from forge.models.logprobs import logprobs_from_hidden
from forge.trainer.packing import MicroBatch


class LogprobModel(nn.Module):
    def __init__(self, model: CausalLM, temperature: float = 1.0, chunk_size: int = 1024, loss_parallel: bool = True):
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.chunk_size = chunk_size
        # tensor parallel lm_head: vocab-parallel softmax (True) or gather the whole weight first
        self.loss_parallel = loss_parallel

    def forward(self, tokens: Tensor, positions: Tensor, document_ids: Tensor | None, gather_idx: Tensor,
                targets: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.model(tokens, positions, document_ids, return_hidden=True)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, gather_idx)
        w = self.model.lm_head.weight
        if not self.loss_parallel and hasattr(w, "full_tensor"):
            w = w.full_tensor()
        return logprobs_from_hidden(h, w, targets, self.temperature, self.chunk_size)


def run_microbatch(module: LogprobModel, mb: MicroBatch, width: int) -> tuple[Tensor, Tensor]:
    """Logprobs and entropy of one packed micro-batch, scattered back to `[rows, width]` (0 elsewhere)."""
    one_doc = mb.rows.numel() == 1 and bool((mb.document_ids == 0).all())
    # a row holding a single sequence needs no document mask: plain causal attention (fast path)
    docs = None if one_doc else mb.document_ids
    lp, ent = module(mb.tokens, mb.positions, docs, mb.gather_idx, mb.targets)
    b = max(mb.rows.numel(), 1)
    lp_mat = lp.new_zeros(b, width).index_put((mb.out_row, mb.out_col), lp)
    ent_mat = ent.new_zeros(b, width).index_put((mb.out_row, mb.out_col), ent)
    return lp_mat, ent_mat


def agg_mode(loss_fn: nn.Module) -> str:
    return getattr(loss_fn, "agg", None) or getattr(loss_fn, "loss_agg_mode", None) or "token-mean"


def normaliser_counts(padding_mask: Tensor) -> tuple[float, float]:
    """(trained tokens, sequences with >= 1 trained token) of a `[B, R]` mask."""
    m = padding_mask.bool()
    return float(m.sum()), float((m.sum(1) > 0).sum())


def microbatch_weight(mode: str, mb_counts: tuple[float, float], total: tuple[float, float]) -> float:
    i = 0 if mode == "token-mean" else 1
    return mb_counts[i] / total[i] if total[i] > 0 else 0.0


def sft_loss(logprobs: Tensor, loss_mask: Tensor) -> Tensor:
    """Cross-entropy on the trained tokens: -token-mean of their logprobs (0 if there are none).

    logprobs, loss_mask `[B, R]`; what `apps/sft` trains with (through `SFTLoss` or directly).
    """
    if logprobs.shape != loss_mask.shape:
        raise ValueError(f"sft_loss: logprobs {tuple(logprobs.shape)} and loss_mask {tuple(loss_mask.shape)} differ")
    m = loss_mask.to(logprobs.dtype)
    return -(torch.where(m.bool(), logprobs, 0.0) * m).sum() / m.sum().clamp(min=1)


class SFTLoss(nn.Module):
    """`sft_loss` behind the policy-loss signature, so SFT reuses the trainer's step."""

    agg = "token-mean"
    needs_ref = False
    needs_old_logprobs = False

    def forward(self, logprobs: Tensor, ref_logprobs: Tensor | None, advantages: Tensor | None, padding_mask: Tensor,
                **_: object) -> Tensor:
        return sft_loss(logprobs, padding_mask)
