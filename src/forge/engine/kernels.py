"""Triton kernels of the fused decode step (CUDA; tests run them with TRITON_INTERPRET=1).

One decode layer is 8 launches: `add_rmsnorm` (residual add + RMSNorm; the first layer's also
gathers the embedding rows), the merged q/k/v projection (cuBLAS), `attention` (q/k RMSNorm
for Qwen3, RoPE, the k/v write into the paged cache and paged attention, all in one program
per (sequence, kv head)), o_proj (cuBLAS), `add_rmsnorm`, the merged gate/up projection
(cuBLAS), `silu_mul`, down_proj (cuBLAS); 6 with the RMSNorms folded into the projections
(`forge.engine.fused`, `fold_norms`: attention and silu_mul then apply each row's norm scale, the
residual adds run in the o/down GEMMs). A small decode batch at a long context splits each
row's context across several attention programs (flash-decoding, combined in the same launch;
`attention_splits`). With the norms unfolded every kernel rounds to the activation dtype exactly
where the eager modules of `forge.models.decoder` do, so the fused step computes the same
function as `CausalLM.forward` (up to summation order).

Sampling (`sample`): two launches over the [B, V] logits, read once in their own dtype. The
first splits each row into chunks and writes each chunk's max and sum of exp; the second
combines them (log-sum-exp), draws the row's uniform (the counter hash of
`forge.engine.sampler.counter_uniform`, or a given one), finds the chunk where the cumulative
mass crosses it and scans only that chunk (a greedy row: the first chunk holding the maximum,
for the maximum's first index). Inverse-CDF sampling over the full
temperature-scaled softmax, as the torch sampler does, with no sort, no float32 copy of the
logits and no cumulative sum over the whole vocabulary.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - CPU-only installs
    HAS_TRITON = False


if HAS_TRITON:

    # ---- norms / activations -----------------------------------------------------------------
    @triton.jit
    def _add_rmsnorm_kernel(X, R, TOK, W, Y, HOUT, H, s_x, s_r, s_y, s_h, eps,
                            BLOCK: tl.constexpr, HAS_RES: tl.constexpr, EMBED: tl.constexpr):
        """h = x + r (rounded to x's dtype), written to HOUT; y = round(h * rsqrt(mean(h^2) + eps) * w).
        EMBED: x is the embedding row TOK[row] of X."""
        row = tl.program_id(0)
        c = tl.arange(0, BLOCK)
        mask = c < H
        if EMBED:
            xrow = tl.load(TOK + row).to(tl.int64)
        else:
            xrow = row.to(tl.int64)
        x = tl.load(X + xrow * s_x + c, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(R + row.to(tl.int64) * s_r + c, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(HOUT + row.to(tl.int64) * s_h + c, x, mask=mask)
        xf = x.to(tl.float32)
        rs = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / H + eps)
        w = tl.load(W + c, mask=mask, other=0.0)
        y = xf * rs * w.to(tl.float32)  # one rounding, as F.rms_norm (RMSNorm with weight and x of one dtype)
        tl.store(Y + row.to(tl.int64) * s_y + c, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(G, U, O, N, s_g, s_u, s_o, X, s_x, HID, eps,
                         BLOCK: tl.constexpr, ROWSCALE: tl.constexpr, HP: tl.constexpr):
        """o = round(round(silu(g)) * u), as F.silu(g) * u in the activation dtype.
        ROWSCALE (a folded RMSNorm): g and u are first multiplied by the RMSNorm scale of row X[row]."""
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = c < N
        if ROWSCALE:  # issued first: its load overlaps g's and u's
            hc = tl.arange(0, HP)
            x = tl.load(X + row * s_x + hc, mask=hc < HID, other=0.0).to(tl.float32)
        g = tl.load(G + row * s_g + c, mask=mask, other=0.0)
        u = tl.load(U + row * s_u + c, mask=mask, other=0.0)
        gf, uf = g.to(tl.float32), u.to(tl.float32)
        if ROWSCALE:
            rs = 1.0 / tl.sqrt(tl.sum(x * x, 0) / HID + eps)
            gf, uf = gf * rs, uf * rs
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        o = s.to(tl.float32) * uf
        tl.store(O + row * s_o + c, o.to(O.dtype.element_ty), mask=mask)

    # ---- attention -----------------------------------------------------------------------------
    @triton.jit
    def _head_load(P, h, d, d_rot, dm, BP, D: tl.constexpr, HAS_BIAS: tl.constexpr):
        """The heads `h` ([R] head indices) at row P, as is and rotated by half (for RoPE), and the
        projection's bias at the same places (zeros without HAS_BIAS). Issued before anything waits on
        them: the prologue's loads then overlap instead of queueing behind one another."""
        x = tl.load(P + h[:, None] * D + d[None, :], mask=dm[None, :], other=0.0)
        xr = tl.load(P + h[:, None] * D + d_rot[None, :], mask=dm[None, :], other=0.0)
        if HAS_BIAS:
            bx = tl.load(BP + h[:, None] * D + d[None, :], mask=dm[None, :], other=0.0).to(tl.float32)
            bxr = tl.load(BP + h[:, None] * D + d_rot[None, :], mask=dm[None, :], other=0.0).to(tl.float32)
        else:
            bx = tl.zeros(x.shape, tl.float32)
            bxr = bx
        return x, xr, bx, bxr

    @triton.jit
    def _head_rope(x, xr, bx, bxr, d, d_rot, dm, sign, cos, sin, NW, eps, rs,
                   D: tl.constexpr, QK_NORM: tl.constexpr, ROWSCALE: tl.constexpr):
        """RMSNorm (optional) + rotate-half RoPE of heads loaded by `_head_load`.
        ROWSCALE: the projection was computed from the un-normalised residual with the norm weight
        folded into its weight: x * rs + bias, rounded as the projection's output."""
        xf, xrf = x.to(tl.float32), xr.to(tl.float32)
        if ROWSCALE:
            xf = (xf * rs + bx).to(x.dtype).to(tl.float32)
            xrf = (xrf * rs + bxr).to(x.dtype).to(tl.float32)
        if QK_NORM:
            rs_h = 1.0 / tl.sqrt(tl.sum(xf * xf, 1) / D + eps)
            w = tl.load(NW + d, mask=dm, other=0.0).to(tl.float32)
            wr = tl.load(NW + d_rot, mask=dm, other=0.0).to(tl.float32)
            xf = (xf * rs_h[:, None] * w[None, :]).to(x.dtype).to(tl.float32)
            xrf = (xrf * rs_h[:, None] * wr[None, :]).to(x.dtype).to(tl.float32)
        return (xf * cos[None, :] + (sign[None, :] * xrf) * sin[None, :]).to(x.dtype)

    @triton.jit
    def _attention_kernel(Q, K, V, s_q, s_k, s_v, KC, VC, BT, POS, COS, SIN, QNW, KNW, O, s_o,
                          s_bt, s_cn, s_ct, s_ch, scale, eps, PML, PACC, CNT, X, s_x, HID, norm_eps, QB, KB, VB,
                          G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                          BS: tl.constexpr, TN: tl.constexpr, QK_NORM: tl.constexpr, IEEE: tl.constexpr,
                          NBLK: tl.constexpr, SPLITS: tl.constexpr, SP2: tl.constexpr, PREFETCH: tl.constexpr,
                          ROWSCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HP: tl.constexpr):
        """One program per (sequence b, kv head h, context split s): RoPE q (G heads) and k, write
        k/v at position POS[b] of the paged cache, attend over positions [0, POS[b]] (cache + the
        new token). D = head_dim, padded to DP (a power of 2) in registers.

        SPLITS > 1 (flash-decoding): split s attends over its share of the cached iterations; the
        last split also owns the new token (and its cache write). Each split writes its running
        max / sum / unnormalised output to PML/PACC and bumps the (b, h) counter CNT; the split
        that arrives last combines all partials, writes O and resets the counter to 0 (so the
        next launch, or the next replay of a CUDA graph, starts from zero).

        ROWSCALE (the layer's input RMSNorm folded into the q/k/v weight): q/k/v were projected from
        the un-normalised residual X[b]; each is scaled by that row's RMSNorm scale (and gets the
        projection's bias QB/KB/VB) here, before RoPE."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.program_id(2)
        b64 = b.to(tl.int64)
        g = tl.arange(0, GP)
        d = tl.arange(0, DP)
        dm = d < D
        half: tl.constexpr = D // 2
        d_rot = tl.where(dm, (d + half) % D, 0)
        sign = tl.where(d < half, -1.0, 1.0)
        gm = g < G
        qh = tl.where(gm, h * G + g, h * G)  # padded rows re-read a real head; never stored
        one = tl.arange(0, 1)
        if ROWSCALE:  # the residual row for the folded norm's scale, loaded first (reduced below)
            hc = tl.arange(0, HP)
            xrow = tl.load(X + b64 * s_x + hc, mask=hc < HID, other=0.0).to(tl.float32)
        qx, qxr, qb, qbr = _head_load(Q + b64 * s_q, qh, d, d_rot, dm, QB, D, HAS_BIAS)  # [GP, DP]
        kx, kxr, kb, kbr = _head_load(K + b64 * s_k, h + one, d, d_rot, dm, KB, D, HAS_BIAS)  # [1, DP]
        v_new = tl.load(V + b64 * s_v + h * D + d, mask=dm, other=0.0)
        if HAS_BIAS:
            vb = tl.load(VB + h * D + d, mask=dm, other=0.0).to(tl.float32)
        pos = tl.load(POS + b)
        cos = tl.load(COS + pos.to(tl.int64) * D + d, mask=dm, other=0.0)
        sin = tl.load(SIN + pos.to(tl.int64) * D + d, mask=dm, other=0.0)
        rs = 1.0
        if ROWSCALE:
            rs = 1.0 / tl.sqrt(tl.sum(xrow * xrow, 0) / HID + norm_eps)
            vf = v_new.to(tl.float32) * rs
            if HAS_BIAS:
                vf += vb
            v_new = vf.to(v_new.dtype)
        q = _head_rope(qx, qxr, qb, qbr, d, d_rot, dm, sign, cos, sin, QNW, eps, rs, D, QK_NORM, ROWSCALE)
        k_new = _head_rope(kx, kxr, kb, kbr, d, d_rot, dm, sign, cos, sin, KNW, eps, rs, D, QK_NORM, ROWSCALE)
        own_new = sp == SPLITS - 1
        blk = tl.load(BT + b64 * s_bt + pos // BS).to(tl.int64)
        dst = blk * s_cn + (pos % BS) * s_ct + h * s_ch
        tl.store(KC + dst + one[:, None] * 0 + d[None, :], k_new, mask=dm[None, :] & own_new)
        tl.store(VC + dst + d, v_new, mask=dm & own_new)

        m = tl.full([GP], float("-inf"), tl.float32)
        l = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        t = tl.arange(0, TN)
        n_it = tl.cdiv(pos, TN)
        per = tl.cdiv(n_it, SPLITS)
        j_lo = sp * per
        j_hi = tl.minimum(j_lo + per, n_it)
        # the block-table entry of the next iteration is loaded one iteration ahead: the K/V loads of an
        # iteration then do not wait a full memory latency for their block number
        nxt = tl.load(BT + b64 * s_bt + j_lo, mask=(j_lo < j_hi) & PREFETCH, other=0)
        for j in range(j_lo, j_hi):  # cached positions [0, pos), this split's share
            tt = j * TN + t
            valid = tt < pos
            if NBLK == 1 and PREFETCH:
                cur = nxt
                nxt = tl.load(BT + b64 * s_bt + j + 1, mask=j + 1 < j_hi, other=0)
                off = cur.to(tl.int64) * s_cn + t * s_ct + h * s_ch
            elif NBLK == 1:  # one cache block per iteration (TN == BS): one table entry
                off = tl.load(BT + b64 * s_bt + j).to(tl.int64) * s_cn + t * s_ct + h * s_ch
            elif NBLK == 2:  # two whole blocks per iteration (TN == 2 BS)
                b0 = tl.load(BT + b64 * s_bt + 2 * j).to(tl.int64)
                b1 = tl.load(BT + b64 * s_bt + 2 * j + 1, mask=(2 * j + 1) * BS < pos, other=0).to(tl.int64)
                off = tl.where(t < BS, b0, b1) * s_cn + (t % BS) * s_ct + h * s_ch
            else:  # any block size: a table entry per token
                tb = tl.load(BT + b64 * s_bt + tt // BS, mask=valid, other=0).to(tl.int64)
                off = tb * s_cn + (tt % BS) * s_ct + h * s_ch
            kv_mask = valid[:, None] & dm[None, :]
            kt = tl.load(KC + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            vt = tl.load(VC + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(kt), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(kt)) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            m = m_new
        if own_new:  # the new token, from registers
            s_n = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), 1) * scale  # [GP]
            m_new = tl.maximum(m, s_n)
            alpha = tl.exp(m - m_new)
            p_n = tl.exp(s_n - m_new)
            l = l * alpha + p_n
            acc = acc * alpha[:, None] + p_n.to(v_new.dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)[None, :]
            m = m_new
        o_ptr = O + b64 * s_o + (h * G + g)[:, None] * D + d[None, :]
        o_mask = gm[:, None] & dm[None, :]
        if SPLITS == 1:
            tl.store(o_ptr, (acc / l[:, None]).to(O.dtype.element_ty), mask=o_mask)
        else:
            bh = b64 * tl.num_programs(1) + h
            part = bh * SPLITS + sp
            tl.store(PML + part * 2 * GP + g, m)
            tl.store(PML + part * 2 * GP + GP + g, l)
            tl.store(PACC + part * GP * DP + g[:, None] * DP + d[None, :], acc)
            # release: this split's partials are visible before the count; acquire: the last
            # split sees every other split's partials
            done = tl.atomic_add(CNT + bh, 1, sem="acq_rel")
            if done == SPLITS - 1:
                s_ = tl.arange(0, SP2)
                sm = s_ < SPLITS
                ml = PML + (bh * SPLITS + s_)[:, None] * 2 * GP + g[None, :]
                ms = tl.load(ml, mask=sm[:, None], other=float("-inf"), cache_modifier=".cg")  # [SP2, GP]
                ls = tl.load(ml + GP, mask=sm[:, None], other=0.0, cache_modifier=".cg")
                m_all = tl.max(ms, 0)  # finite: the last split always holds the new token
                w = tl.exp(ms - m_all[None, :])  # empty splits: exp(-inf) = 0
                l_all = tl.sum(w * ls, 0)
                pa = (PACC + (bh * SPLITS + s_)[:, None, None] * GP * DP + g[None, :, None] * DP
                      + d[None, None, :])
                accs = tl.load(pa, mask=sm[:, None, None], other=0.0, cache_modifier=".cg")  # [SP2, GP, DP]
                out = tl.sum(accs * w[:, :, None], 0) / l_all[:, None]
                tl.store(o_ptr, out.to(O.dtype.element_ty), mask=o_mask)
                tl.atomic_xchg(CNT + bh, 0)

    @triton.jit
    def _rope_store_kernel(Q, K, V, s_q, s_k, s_v, KC, VC, SLOTS, POS, COS, SIN, QNW, KNW, QO, KO, s_qo, s_ko,
                           s_ct, s_ch, eps, HQ: tl.constexpr, HQP: tl.constexpr, HKV: tl.constexpr,
                           HKP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, QK_NORM: tl.constexpr):
        """Prefill: one program per token row, all its heads: q heads RoPE'd into QO; k heads RoPE'd
        into KO and the cache, v into the cache (slot SLOTS[row]; padded rows write the scratch block).
        Head counts are padded to powers of 2 (HQP, HKP); padded rows re-read head 0, never stored."""
        r = tl.program_id(0).to(tl.int64)
        pos = tl.load(POS + r)
        d = tl.arange(0, DP)
        dm = d < D
        half: tl.constexpr = D // 2
        d_rot = tl.where(dm, (d + half) % D, 0)
        sign = tl.where(d < half, -1.0, 1.0)
        cos = tl.load(COS + pos * D + d, mask=dm, other=0.0)
        sin = tl.load(SIN + pos * D + d, mask=dm, other=0.0)
        hq = tl.arange(0, HQP)
        qm = (hq < HQ)[:, None] & dm[None, :]
        xq, xqr, _, _ = _head_load(Q + r * s_q, tl.where(hq < HQ, hq, 0), d, d_rot, dm, Q, D, False)
        x = _head_rope(xq, xqr, xq, xqr, d, d_rot, dm, sign, cos, sin, QNW, eps, 1.0, D, QK_NORM, False)
        tl.store(QO + r * s_qo + hq[:, None] * D + d[None, :], x, mask=qm)
        hk = tl.arange(0, HKP)
        km = (hk < HKV)[:, None] & dm[None, :]
        hk_ = tl.where(hk < HKV, hk, 0)
        xk, xkr, _, _ = _head_load(K + r * s_k, hk_, d, d_rot, dm, K, D, False)
        x = _head_rope(xk, xkr, xk, xkr, d, d_rot, dm, sign, cos, sin, KNW, eps, 1.0, D, QK_NORM, False)
        tl.store(KO + r * s_ko + hk[:, None] * D + d[None, :], x, mask=km)
        slot = tl.load(SLOTS + r)
        dst = slot * s_ct + hk[:, None] * s_ch + d[None, :]
        tl.store(KC + dst, x, mask=km)
        v = tl.load(V + r * s_v + hk_[:, None] * D + d[None, :], mask=km, other=0.0)
        tl.store(VC + dst, v, mask=km)

    # ---- sampling ------------------------------------------------------------------------------
    @triton.jit
    def _mix32(x):
        c = tl.full([], 0x45D9F3B, tl.uint32)
        x = x ^ (x >> 16)
        x = x * c
        x = x ^ (x >> 16)
        x = x * c
        return x ^ (x >> 16)

    @triton.jit
    def _counter_uniform(seed, stream, counter):
        """`forge.engine.sampler.counter_uniform` for one row (int64 scalars) -> float64."""
        m32 = 0xFFFFFFFF
        h = _mix32((seed & m32).to(tl.uint32) ^ tl.full([], 0x3C6EF372, tl.uint32))
        h = _mix32(h ^ ((seed >> 32) & m32).to(tl.uint32))
        h = _mix32(h ^ (stream & m32).to(tl.uint32))
        hi = _mix32(h ^ (counter & m32).to(tl.uint32))
        lo = _mix32(hi ^ tl.full([], 0x9E3779B9, tl.uint32))
        bits = ((hi >> 6).to(tl.uint64) << 27) | (lo >> 5).to(tl.uint64)
        return (bits.to(tl.float64) + 0.5) / 9007199254740992.0

    @triton.jit
    def _sample_partial_kernel(L, s_l, TEMP, PM, PS, V, NSPLIT, CH: tl.constexpr, BLOCK: tl.constexpr):
        """Chunk c of row b: max and sum of exp of z = logits * (1 / T) (T = 1 for greedy rows).

        A multiply by the reciprocal, not a division per logit: the pass reads 78 MB at B=256 and a
        float32 division is a dozen instructions, which made it instruction-bound."""
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        t = tl.load(TEMP + b)
        tinv = 1.0 / tl.where(t > 0, t, 1.0)
        start = c * CH
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.full([], 0.0, tl.float32)
        k = tinv * 1.4426950408889634  # log2(e) / T: exp(x / T - m) = exp2(x * k - m * log2(e)), one FMA
        for it in range(0, CH // BLOCK):
            idx = start + it * BLOCK + tl.arange(0, BLOCK)
            x = tl.load(L + b * s_l + idx, mask=idx < V, other=float("-inf"))
            # max(x) * (1/T) == max(x * (1/T)) exactly (rounding is monotone): the max needs no multiply
            m_new = tl.maximum(m, tl.max(x, 0).to(tl.float32) * tinv)
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp2(x.to(tl.float32) * k - m_new * 1.4426950408889634), 0)
            m = m_new
        o = b * NSPLIT + c
        tl.store(PM + o, m)
        tl.store(PS + o, s)

    @triton.jit
    def _sample_final_kernel(L, s_l, TEMP, PM, PS, V, NSPLIT, SEED, STREAM, COUNTER, U,
                             OUT_TOK, OUT_LP, CH: tl.constexpr, BLOCK: tl.constexpr, NP: tl.constexpr,
                             ANY_GREEDY: tl.constexpr, HAS_U: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, NP)
        cm = c < NSPLIT
        pm = tl.load(PM + b * NSPLIT + c, mask=cm, other=float("-inf"))
        ps = tl.load(PS + b * NSPLIT + c, mask=cm, other=0.0)
        mx = tl.max(pm, 0)
        w = tl.where(cm, ps * tl.exp(pm - mx), 0.0)
        total = tl.sum(w, 0)
        lse = mx + tl.log(total)
        t = tl.load(TEMP + b)
        greedy = t <= 0
        tinv = 1.0 / tl.where(t > 0, t, 1.0)
        # the row's uniform
        u = _counter_uniform(tl.load(SEED + b), tl.load(STREAM + b), tl.load(COUNTER + b))
        if HAS_U:
            u = tl.where(tl.load(SEED + b) >= 0, u, tl.load(U + b))
        # chunk where the cumulative mass crosses u * total
        cw = tl.cumsum(w, 0)
        clast = tl.max(cw, 0)
        target = (u * total.to(tl.float64)).to(tl.float32)
        target = tl.minimum(target, clast * 0.99999988)
        cs_ = tl.minimum(tl.sum((cw <= target).to(tl.int32), 0), NSPLIT - 1)
        prev = tl.sum(tl.where(c == cs_ - 1, cw, 0.0), 0)
        if ANY_GREEDY:  # greedy rows: the first chunk holding the maximum, scanned for its first occurrence
            cs_ = tl.where(greedy, tl.min(tl.where(pm == mx, c, NP), 0), cs_)
        pm_c = tl.sum(tl.where(c == cs_, pm, 0.0), 0)
        r = (target - prev) / tl.exp(pm_c - mx)  # in units of exp(z - pm_c)
        start = cs_ * CH
        run = tl.full([], 0.0, tl.float32)
        found = tl.full([], -1, tl.int32)
        last = start
        for it in range(0, CH // BLOCK):
            idx = start + it * BLOCK + tl.arange(0, BLOCK)
            valid = idx < V
            z = tl.load(L + b * s_l + idx, mask=valid, other=float("-inf")).to(tl.float32) * tinv
            e = tl.where(valid, tl.exp(z - pm_c), 0.0)
            cum = tl.cumsum(e, 0) + run
            top = tl.max(cum, 0)
            n_le = tl.sum((cum <= r).to(tl.int32), 0)
            hit = (found < 0) & (top > r)
            if ANY_GREEDY:  # greedy: the first index where z reaches the chunk's (= the row's) maximum
                first = tl.min(tl.where(valid & (z == pm_c), idx, V), 0)
                hit = tl.where(greedy, (found < 0) & (first < V), hit)
                n_le = tl.where(greedy, first - start - it * BLOCK, n_le)
            found = tl.where(hit, start + it * BLOCK + n_le, found)
            last = tl.maximum(last, tl.max(tl.where(e > 0, idx, -1), 0))
            run = top
        tok = tl.where(found >= 0, found, last)
        xt = tl.load(L + b * s_l + tok).to(tl.float32)
        tl.store(OUT_TOK + b, tok.to(tl.int64))
        tl.store(OUT_LP + b, xt * tinv - lse)

    @triton.jit(do_not_specialize=["n"])  # the batch size must not pick a new compilation (a JIT mid-run)
    def _advance_kernel(TOK_IN, POS, COUNTER, OUT_TOK, n):
        """The next decode step of the same batch: feed the sampled tokens, move one position on."""
        i = tl.program_id(0) * 256 + tl.arange(0, 256)
        mask = i < n
        tl.store(TOK_IN + i, tl.load(OUT_TOK + i, mask=mask).to(TOK_IN.dtype.element_ty), mask=mask)
        tl.store(POS + i, tl.load(POS + i, mask=mask) + 1, mask=mask)
        tl.store(COUNTER + i, tl.load(COUNTER + i, mask=mask) + 1, mask=mask)


# ---- Python wrappers ---------------------------------------------------------------------------
def _np2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                tokens: torch.Tensor | None = None, h_out: torch.Tensor | None = None,
                y_out: torch.Tensor | None = None, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y): h = x + residual (or x, or the embedding rows x[tokens]); y = RMSNorm(h) * weight.
    `h_out` may be `x` itself (in place). Rows: x is [M, H] (or [V, H] with tokens [M])."""
    hdim = x.shape[-1]
    m = tokens.shape[0] if tokens is not None else x.shape[0]
    h = h_out if h_out is not None else torch.empty(m, hdim, dtype=x.dtype, device=x.device)
    y = y_out if y_out is not None else torch.empty(m, hdim, dtype=x.dtype, device=x.device)
    r = residual if residual is not None else x
    _add_rmsnorm_kernel[(m,)](x, r, tokens if tokens is not None else x, weight, y, h, hdim,
                              x.stride(0), r.stride(0), y.stride(0), h.stride(0), eps,
                              BLOCK=_np2(hdim), HAS_RES=residual is not None, EMBED=tokens is not None,
                              num_warps=num_warps or max(1, min(8, hdim // 1024)))  # H200, 896: 1 warp 1.83 us, 4: 1.90
    return h, y


def silu_mul(g: torch.Tensor, u: torch.Tensor, out: torch.Tensor | None = None, block: int | None = None,
             num_warps: int = 4, norm_x: torch.Tensor | None = None, norm_eps: float = 1e-6) -> torch.Tensor:
    """silu(g) * u. `norm_x` [M, H] (a folded RMSNorm, see `forge.engine.fused`): g and u were
    projected from the un-normalised rows norm_x with the norm weight folded into the gate/up
    weight; both are first scaled by each row's rsqrt(mean(norm_x^2) + norm_eps)."""
    m, n = g.shape
    o = out if out is not None else torch.empty(m, n, dtype=g.dtype, device=g.device)
    block = min(block or 1024, _np2(n))  # H200, B=256 x 4864: 1024 x 4 warps 2.42 us, 2048 x 4: 2.58 (bench/decode_kernels.py)
    x = norm_x if norm_x is not None else g
    _silu_mul_kernel[(m, triton.cdiv(n, block))](g, u, o, n, g.stride(0), u.stride(0), o.stride(0),
                                                  x, x.stride(0), x.shape[1], norm_eps,
                                                  BLOCK=block, ROWSCALE=norm_x is not None, HP=_np2(x.shape[1]),
                                                  num_warps=num_warps)
    return o


# tuned on an H100 for B=256, ctx ~384, GQA 7:1, head_dim 64 (docs/perf/NOTES_generate.md)
ATTN_TOKENS = 64  # tokens per iteration when the block size is not 32/64/128
ATTN_BLOCKS = 1  # else whole cache blocks per iteration (1 or 2)
ATTN_WARPS = 4
ATTN_STAGES = 2
# split (flash-decoding) launches: each program walks a long context, so the next iteration's block-table
# entry is loaded one iteration ahead, with 3 pipeline stages. H200, every layer's cache read once from
# HBM: 16 x 4096 at 8 splits 24.7 -> 19.1 us/layer; at B=256 x 384 (1 split) it costs 1.5%, so it is
# off there (docs/perf/NOTES_generate.md)
ATTN_PREFETCH_TABLE = True
ATTN_STAGES_SPLIT = 3


ATTN_MAX_SPLITS = 8
ATTN_TARGET_PROGRAMS = 2.0  # split the context until (seqs x kv heads x splits) >= this many x SMs


def attention_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Context splits per (sequence, kv head) so that a small decode batch still fills the GPU
    (flash-decoding): 1 when batch x kv heads already gives every SM work."""
    sms = _sm_count(device)
    want = -(-int(ATTN_TARGET_PROGRAMS * sms) // max(1, batch * num_kv_heads))
    return max(1, min(ATTN_MAX_SPLITS, want))


_SMS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: any small number exercises the split path
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


class AttentionWorkspace:
    """Scratch of the split attention: per (row, kv head, split) max/sum [2, GP] and output
    [GP, DP] partials in float32, and the (row, kv head) arrival counters (int32, zero between
    launches). Sized for every batch up to `rows` at its default split count (or `splits` for
    all of them), allocated once, before any CUDA graph capture."""

    def __init__(self, rows: int, num_heads: int, num_kv_heads: int, head_dim: int, device: torch.device,
                 splits: int | None = None):
        g = num_heads // num_kv_heads
        self.gp, self.dp, self.num_kv, self.rows = max(16, _np2(g)), max(16, _np2(head_dim)), num_kv_heads, rows
        if splits is not None:
            self.parts = rows * num_kv_heads * splits
        else:  # the default splits shrink as the batch grows: b x splits(b) stays ~ a constant
            self.parts = max(b * num_kv_heads * attention_splits(b, num_kv_heads, device) for b in range(1, rows + 1))
        self.ml = torch.empty(self.parts * 2 * self.gp, dtype=torch.float32, device=device)
        self.acc = torch.empty(self.parts * self.gp * self.dp, dtype=torch.float32, device=device)
        self.count = torch.zeros(rows * num_kv_heads, dtype=torch.int32, device=device)

    def fits(self, rows: int, splits: int) -> bool:
        return rows <= self.rows and rows * self.num_kv * splits <= self.parts


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              block_tables: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              num_heads: int, q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
              eps: float = 1e-6, out: torch.Tensor | None = None, tokens: int | None = None,
              num_warps: int | None = None, num_stages: int | None = None, splits: int | None = None,
              workspace: AttentionWorkspace | None = None, norm_x: torch.Tensor | None = None,
              norm_eps: float = 1e-6, qkv_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention for one new token per row, RoPE and the cache write included.

    q [B, Hq*D], k/v [B, Hkv*D] (rows may be strided views of one qkv buffer; heads contiguous),
    caches [NB, BS, Hkv, D], block_tables [B, MB] int32, pos [B] int32 (the new token's position),
    cos/sin [P, D] float32 tables. Returns [B, Hq*D].

    `splits` (default `attention_splits`) > 1 splits each row's context across that many programs
    and combines them in the kernel; it needs a `workspace` (allocated here when not given: pass
    one when capturing a CUDA graph).

    `norm_x` [B, H] (the input RMSNorm folded into the q/k/v weight, see `forge.engine.fused`): q/k/v
    were projected from these un-normalised rows without bias; each row is scaled by its
    rsqrt(mean(norm_x^2) + norm_eps) and gets `qkv_bias` [(Hq + 2 Hkv) * D] here."""
    b = q.shape[0]
    nb, bs, hkv, d = k_cache.shape
    if qkv_bias is not None and norm_x is None:
        raise ValueError("attention: qkv_bias is only applied with norm_x (a folded norm)")
    g = num_heads // hkv
    o = out if out is not None else torch.empty(b, num_heads * d, dtype=q.dtype, device=q.device)
    qk_norm = q_norm is not None
    tn = tokens or (bs * ATTN_BLOCKS if bs in (32, 64, 128) else ATTN_TOKENS)
    if tn < 16 or tn & (tn - 1):
        raise ValueError(f"attention: tokens per iteration must be a power of 2 >= 16, got {tn}")
    if splits is None:
        splits = attention_splits(b, hkv, q.device)
    if splits > 1 and workspace is None:
        workspace = AttentionWorkspace(b, num_heads, hkv, d, q.device, splits=splits)
    if splits > 1 and not workspace.fits(b, splits):
        raise ValueError(f"attention: the workspace holds {workspace.parts} (row, kv head, split) partials for "
                         f"<= {workspace.rows} rows; asked for {b} rows x {hkv} kv heads x {splits} splits")
    ws = (workspace.ml, workspace.acc, workspace.count) if splits > 1 else (o, o, o)
    x = norm_x if norm_x is not None else q
    nq, nk = num_heads * d, hkv * d
    qkv_b = (qkv_bias[:nq], qkv_bias[nq:nq + nk], qkv_bias[nq + nk:]) if qkv_bias is not None else (q, q, q)
    _attention_kernel[(b, hkv, splits)](
        q, k, v, q.stride(0), k.stride(0), v.stride(0), k_cache, v_cache, block_tables, pos, cos, sin,
        q_norm if qk_norm else q, k_norm if qk_norm else q, o, o.stride(0),
        block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), d ** -0.5, eps, *ws,
        x, x.stride(0), x.shape[1], norm_eps, *qkv_b,
        G=g, GP=max(16, _np2(g)), D=d, DP=max(16, _np2(d)), BS=bs, TN=tn, QK_NORM=qk_norm,
        IEEE=q.dtype == torch.float32, NBLK=1 if tn == bs else (2 if tn == 2 * bs else 0),
        SPLITS=splits, SP2=max(2, _np2(splits)), PREFETCH=ATTN_PREFETCH_TABLE and splits > 1,
        ROWSCALE=norm_x is not None, HAS_BIAS=qkv_bias is not None, HP=_np2(x.shape[1]),
        num_warps=num_warps or ATTN_WARPS, num_stages=num_stages or (ATTN_STAGES_SPLIT if splits > 1 else ATTN_STAGES),
    )
    return o


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               slots: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
               q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6):
    """Prefill rows: q [N, Hq*D], k/v [N, Hkv*D] -> (RoPE'd q [N, Hq*D], RoPE'd k [N, Hkv*D]); k/v written
    to the cache at slots [N] (int64). pos [N] int64."""
    n = q.shape[0]
    nb, bs, hkv, d = k_cache.shape
    qo = torch.empty(n, num_heads * d, dtype=q.dtype, device=q.device)
    ko = torch.empty(n, hkv * d, dtype=q.dtype, device=q.device)
    qk_norm = q_norm is not None
    _rope_store_kernel[(n,)](
        q, k, v, q.stride(0), k.stride(0), v.stride(0), k_cache, v_cache, slots, pos, cos, sin,
        q_norm if qk_norm else q, k_norm if qk_norm else q, qo, ko, qo.stride(0), ko.stride(0),
        k_cache.stride(1), k_cache.stride(2), eps, HQ=num_heads, HQP=_np2(num_heads), HKV=hkv, HKP=_np2(hkv),
        D=d, DP=max(16, _np2(d)), QK_NORM=qk_norm, num_warps=2 if num_heads * d <= 2048 else 4)
    return qo, ko


# first pass: logits per load, loads per program, warps. H200, B=256 x 151,936 bf16 from HBM: 34.3 us (37.3 for
# 4096 x 2; 53.3 before the reciprocal multiply), bench/decode_kernels.py
SAMPLE_CFG = (4096, 1, 8)


def sample(logits: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor, stream: torch.Tensor,
           counter: torch.Tensor, u: torch.Tensor | None = None, any_greedy: bool = True,
           out_tokens: torch.Tensor | None = None, out_logprobs: torch.Tensor | None = None, cfg: tuple | None = None):
    """Full-vocabulary sampling from softmax(logits / T) (argmax where T == 0).

    Each row's uniform is `counter_uniform(seed, stream, counter)` where seed >= 0, else `u`.
    Returns (tokens int64 [B], logprobs float32 [B]): log_softmax(logits / T)[token]
    (T taken as 1 for greedy rows)."""
    b, vocab = logits.shape
    blk, iters, warps = cfg or SAMPLE_CFG
    block = min(blk, _np2(vocab))
    ch = block * max(1, min(iters, triton.cdiv(vocab, block)))
    nsplit = triton.cdiv(vocab, ch)
    dev = logits.device
    pm = torch.empty(b, nsplit, dtype=torch.float32, device=dev)
    ps = torch.empty(b, nsplit, dtype=torch.float32, device=dev)
    tok = out_tokens if out_tokens is not None else torch.empty(b, dtype=torch.int64, device=dev)
    lp = out_logprobs if out_logprobs is not None else torch.empty(b, dtype=torch.float32, device=dev)
    _sample_partial_kernel[(b, nsplit)](logits, logits.stride(0), temperature, pm, ps, vocab, nsplit,
                                        CH=ch, BLOCK=block, num_warps=warps)
    _sample_final_kernel[(b,)](logits, logits.stride(0), temperature, pm, ps, vocab, nsplit, seed, stream,
                               counter, u if u is not None else temperature, tok, lp, CH=ch, BLOCK=block,
                               NP=max(2, _np2(nsplit)), ANY_GREEDY=any_greedy, HAS_U=u is not None, num_warps=8)
    return tok, lp


def advance(tok_in: torch.Tensor, pos: torch.Tensor, counter: torch.Tensor, out_tokens: torch.Tensor, n: int) -> None:
    _advance_kernel[(triton.cdiv(n, 256),)](tok_in, pos, counter, out_tokens, n, num_warps=4)
