"""Strip padding from a trainer batch and pack the real tokens into micro-batches.

The trainer batch (docs/CONTRACTS.md, "Trainer batch") has LEFT-padded prompts and RIGHT-padded responses. Running it
as is would put padding inside attention and shift positions (torchforge's bug: importance
ratios ~0.8 at step 0). Instead every row becomes one `PackedSeq` of real tokens only, and
sequences are packed first-fit-decreasing into rows of at most `max_tokens` tokens. Inside a
row, positions restart at 0 for each sequence and `document_ids` keep attention from crossing
sequences, so each sequence sees exactly what the generator saw.

A sequence's *scored* tokens are `tokens[n_prompt:]`: the logprob of token t is read from the
hidden state at t-1. Tokens after the last scored one are dropped: causality means they cannot
change any scored logprob.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PackedSeq:
    row: int  # row in the batch
    tokens: Tensor  # [L] real tokens, prompt first
    n_prompt: int  # index of the first scored token (>= 1)


@dataclass
class MicroBatch:
    tokens: Tensor  # [1, T]
    positions: Tensor  # [1, T]
    document_ids: Tensor  # [1, T]
    gather_idx: Tensor  # [N]: packed positions whose hidden state predicts a scored token
    targets: Tensor  # [N]: the scored tokens
    rows: Tensor  # [b]: batch rows in this micro-batch
    out_row: Tensor  # [N]: local row (index into `rows`) of each scored token
    out_col: Tensor  # [N]: response column of each scored token

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    def to(self, device: torch.device) -> MicroBatch:
        return MicroBatch(*(getattr(self, f).to(device, non_blocking=True) for f in self.__dataclass_fields__))


def sequences_from_rl_batch(
    tokens: Tensor, response_width: int, score_mask: Tensor, prompt_mask: Tensor | None = None,
    pad_id: int | None = None,
) -> list[PackedSeq]:
    """Rows of `tokens [B, P+R]` -> real sequences.

    `score_mask [B, R]`: response positions whose logprob is needed; the sequence is cut after
    its last 1. `prompt_mask [B, P]` marks real prompt tokens; without it, left padding is
    found as the leading run of `pad_id`.
    """
    if tokens.dim() != 2:
        raise ValueError(f"inputs 'tokens' must be [batch, prompt+response], got shape {tuple(tokens.shape)}")
    b, t = tokens.shape
    r = response_width
    p = t - r
    if p < 1:
        raise ValueError(f"tokens have {t} columns but the response has {r}: no room for a prompt")
    if score_mask.shape != (b, r):
        raise ValueError(f"padding_mask has shape {tuple(score_mask.shape)}, expected {(b, r)} from tokens/response")
    if prompt_mask is not None and prompt_mask.shape != (b, p):
        raise ValueError(f"prompt_mask has shape {tuple(prompt_mask.shape)}, expected {(b, p)}")
    tokens, score_mask = tokens.cpu(), score_mask.cpu()
    cols = torch.arange(1, r + 1)
    resp_len = (score_mask.bool() * cols).amax(dim=1).tolist()  # last scored column + 1 (0: none)
    if prompt_mask is not None:
        pm = prompt_mask.cpu().bool()
    elif pad_id is not None:
        # leading run of pad ids (left padding); a pad id inside the prompt stays
        pm = (tokens[:, :p] != pad_id).long().cummax(dim=1).values.bool()
    else:
        raise ValueError("the batch has no 'prompt_mask' and no pad_id is known: cannot find the prompt's "
                         "left padding (set training.pad_id or send prompt_mask)")
    out = []
    for i in range(b):
        if resp_len[i] == 0:
            continue  # nothing to score: no compute at all
        prompt = tokens[i, :p][pm[i]]
        if prompt.numel() == 0:
            raise ValueError(f"row {i} has an empty prompt: its first response token has no context to be scored from")
        out.append(PackedSeq(i, torch.cat([prompt, tokens[i, p:p + resp_len[i]]]), prompt.numel()))
    return out


def sequences_from_sft_batch(tokens: Tensor, loss_mask: Tensor, lengths: Tensor | None = None) -> list[PackedSeq]:
    """SFT rows `tokens [B, T]` (right-padded) with `loss_mask [B, T]` (1: train on predicting
    this token). Scored tokens are columns 1.. of each row; the response width is T-1."""
    if tokens.shape != loss_mask.shape or tokens.dim() != 2:
        raise ValueError(f"SFT batch: tokens {tuple(tokens.shape)} and loss_mask {tuple(loss_mask.shape)} "
                         "must both be [batch, seq_len]")
    if loss_mask[:, :1].bool().any():
        raise ValueError("SFT batch: loss_mask[:, 0] must be 0 (the first token has no context to predict it from)")
    cols = torch.arange(1, tokens.shape[1] + 1)
    last = (loss_mask.cpu().bool() * cols).amax(dim=1)
    if lengths is not None:
        last = torch.minimum(last, lengths.cpu())
    return [PackedSeq(i, tokens[i, :n].cpu(), 1) for i, n in enumerate(last.tolist()) if n >= 2]


def plan_bins(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing. A sequence longer than the budget gets a micro-batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for j, left in enumerate(room):
            if n <= left:
                bins[j].append(i)
                room[j] -= n
                break
        else:
            bins.append([i])
            room.append(max_tokens - n)
    return bins


def pack(seqs: list[PackedSeq], max_tokens: int, pad_to_multiple: int = 1) -> list[MicroBatch]:
    """Pack sequences into single-row micro-batches of about `max_tokens` real tokens.

    `pad_to_multiple` > 1 appends a few padding tokens (their own document, never scored) so
    that the row length suits a fused attention kernel and, under sequence parallelism, splits
    evenly over the TP ranks; on CPU without it, 1 (no padding at all).
    """
    bins = plan_bins([s.tokens.numel() for s in seqs], max_tokens)
    out = []
    for b in bins:
        b = sorted(b, key=lambda i: seqs[i].row)  # stable row order inside a micro-batch
        toks, pos, docs, gidx, tgt, orow, ocol = [], [], [], [], [], [], []
        offset = 0
        for local, i in enumerate(b):
            s = seqs[i]
            n = s.tokens.numel()
            toks.append(s.tokens)
            pos.append(torch.arange(n))
            docs.append(torch.full((n,), local))
            scored = torch.arange(s.n_prompt, n)
            gidx.append(offset + scored - 1)
            tgt.append(s.tokens[s.n_prompt:])
            orow.append(torch.full((scored.numel(),), local))
            ocol.append(scored - s.n_prompt)
            offset += n
        extra = (-offset) % pad_to_multiple
        if extra:
            toks.append(torch.zeros(extra, dtype=torch.long))
            pos.append(torch.arange(extra))
            docs.append(torch.full((extra,), len(b)))
        out.append(MicroBatch(
            tokens=torch.cat(toks).long()[None], positions=torch.cat(pos)[None], document_ids=torch.cat(docs)[None],
            gather_idx=torch.cat(gidx), targets=torch.cat(tgt).long(),
            rows=torch.tensor([seqs[i].row for i in b]), out_row=torch.cat(orow), out_col=torch.cat(ocol),
        ))
    return out


def dummy_microbatch(pad_to_multiple: int = 1) -> MicroBatch:
    """Two tokens (padded up to a multiple of `pad_to_multiple`), one scored: what a rank with no data
    runs so FSDP collectives stay matched."""
    n = 2 + (-2) % pad_to_multiple
    z = torch.zeros(1, n, dtype=torch.long)
    return MicroBatch(tokens=z, positions=torch.arange(n)[None], document_ids=z.clone(),
                      gather_idx=torch.zeros(1, dtype=torch.long), targets=torch.zeros(1, dtype=torch.long),
                      rows=torch.zeros(0, dtype=torch.long), out_row=torch.zeros(1, dtype=torch.long),
                      out_col=torch.zeros(1, dtype=torch.long))
