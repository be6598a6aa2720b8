"""Triton kernels of the fused decode step (CUDA; tests run them with TRITON_INTERPRET=1).

One decode layer is 8 launches: `add_rmsnorm` (residual add + RMSNorm; the first layer's also
gathers the embedding rows), the merged q/k/v projection (cuBLAS), `attention` (q/k RMSNorm
for Qwen3, RoPE, the k/v write into the paged cache and paged attention, all in one program
per (sequence, kv head)), o_proj (cuBLAS), `add_rmsnorm`, the merged gate/up projection
(cuBLAS), `silu_mul`, down_proj (cuBLAS). A small decode batch at a long context splits each
row's context across several attention programs (flash-decoding, combined in the same launch;
`attention_splits`). Every kernel rounds to the activation dtype exactly
where the eager modules of `forge.models.decoder` do, so the fused step computes the same
function as `CausalLM.forward` (up to summation order).

Sampling (`sample`): two launches over the [B, V] logits, read once in their own dtype. The
first splits each row into chunks and writes each chunk's max, sum of exp and argmax; the
second combines them (log-sum-exp, greedy token), draws the row's uniform (the counter hash of
`forge.engine.sampler.counter_uniform`, or a given one), finds the chunk where the cumulative
mass crosses it and scans only that chunk. Inverse-CDF sampling over the full
temperature-scaled softmax, as the torch sampler does, with no sort, no float32 copy of the
logits and no cumulative sum over the whole vocabulary.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except Exception:  # pragma: no cover - older Triton: no TMA path
        TensorDescriptor = None
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
    def _silu_mul_kernel(G, U, O, N, s_g, s_u, s_o, BLOCK: tl.constexpr):
        """o = round(round(silu(g)) * u), as F.silu(g) * u in the activation dtype."""
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = c < N
        g = tl.load(G + row * s_g + c, mask=mask, other=0.0)
        u = tl.load(U + row * s_u + c, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        o = s.to(tl.float32) * u.to(tl.float32)
        tl.store(O + row * s_o + c, o.to(O.dtype.element_ty), mask=mask)

    # ---- attention -----------------------------------------------------------------------------
    @triton.jit
    def _rope_tile(P, row, col, col_rot, m, dd, dd_rot, cos, sin, sign, NW, eps, D: tl.constexpr,
                   QK_NORM: tl.constexpr):
        """RMSNorm (optional, over each row's masked-in columns: one head) + rotate-half RoPE of a
        [R, C] tile of heads: element (r, c) is P[row[r] + col[c]], its rotation partner P[row[r] +
        col_rot[c]]; dd / dd_rot are the columns' dims within their head, m the [R, C] mask."""
        x = tl.load(P + row[:, None] + col[None, :], mask=m, other=0.0)
        xr = tl.load(P + row[:, None] + col_rot[None, :], mask=m, other=0.0)
        xf, xrf = x.to(tl.float32), xr.to(tl.float32)
        if QK_NORM:
            rs = 1.0 / tl.sqrt(tl.sum(xf * xf, 1) / D + eps)
            w = tl.load(NW + dd, mask=dd < D, other=0.0).to(tl.float32)
            wr = tl.load(NW + dd_rot, mask=dd < D, other=0.0).to(tl.float32)
            xf = (xf * rs[:, None] * w[None, :]).to(x.dtype).to(tl.float32)
            xrf = (xrf * rs[:, None] * wr[None, :]).to(x.dtype).to(tl.float32)
        return (xf * cos[None, :] + (sign[None, :] * xrf) * sin[None, :]).to(x.dtype)

    @triton.jit
    def _attention_kernel(Q, K, V, s_q, s_k, s_v, KC, VC, KD, VD, BT, POS, COS, SIN, QNW, KNW, O, s_o,
                          s_bt, s_cn, s_ct, s_ch, scale, eps, PML, PACC, CNT,
                          G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                          BS: tl.constexpr, TN: tl.constexpr, QK_NORM: tl.constexpr, IEEE: tl.constexpr,
                          NBLK: tl.constexpr, SPLITS: tl.constexpr, SP2: tl.constexpr, PREFETCH: tl.constexpr,
                          KVH: tl.constexpr, TMA: tl.constexpr, PIPE: tl.constexpr):
        """One program per (sequence b, group of KVH kv heads, context split s): RoPE q (KVH x G
        heads) and k, write k/v at position POS[b] of the paged cache, attend over positions
        [0, POS[b]] (cache + the new token). D = head_dim, padded to DP (a power of 2) in registers.

        The program's KVH heads are one tile: q is block-diagonal [GP, KVH*DP] (row r = q head
        r of the group, non-zero only in its kv head's columns), so q @ K^T over all KVH heads'
        columns gives each row the scores of its own head, and each row's output is read from its
        own head's columns of p @ V. With KVH = 2 a cache block's K (or V) is one contiguous tile.
        TMA: K/V tiles come through the tensor descriptors KD/VD (the caches as [blocks x BS,
        heads x D]) one whole cache block at a time; positions past the context are read (the
        cache is zero-initialised, so finite) and masked out of the softmax.

        SPLITS > 1 (flash-decoding): split s attends over its share of the cached iterations; the
        last split also owns the new token (and its cache write). Each split writes its running
        max / sum / unnormalised output to PML/PACC and bumps the (b, group) counter CNT; the split
        that arrives last combines all partials, writes O and resets the counter to 0 (so the
        next launch, or the next replay of a CUDA graph, starts from zero)."""
        b = tl.program_id(0)
        hg = tl.program_id(1)
        sp = tl.program_id(2)
        b64 = b.to(tl.int64)
        h0 = hg * KVH
        CW: tl.constexpr = KVH * DP
        pos = tl.load(POS + b)
        r = tl.arange(0, GP)  # q rows: head h0 * G + r of the group
        rm = r < G * KVH
        c = tl.arange(0, CW)  # columns: kv head h0 + c // DP, dim c % DP
        ch = c // DP
        dd = c % DP
        cm = dd < D
        half: tl.constexpr = D // 2
        dd_rot = tl.where(cm, (dd + half) % D, 0)
        sign = tl.where(dd < half, -1.0, 1.0)
        cos = tl.load(COS + pos.to(tl.int64) * D + dd, mask=cm, other=0.0)
        sin = tl.load(SIN + pos.to(tl.int64) * D + dd, mask=cm, other=0.0)
        qown = (ch[None, :] == (r // G)[:, None]) & cm[None, :] & rm[:, None]  # block-diagonal
        q = _rope_tile(Q + b64 * s_q, (h0 * G + r) * D, dd, dd_rot, qown, dd, dd_rot, cos, sin, sign,
                       QNW, eps, D, QK_NORM)  # [GP, CW]
        kr = tl.arange(0, KVH)
        kown = (ch[None, :] == kr[:, None]) & cm[None, :]
        k_new = tl.sum(_rope_tile(K + b64 * s_k, (h0 + kr) * D, dd, dd_rot, kown, dd, dd_rot, cos, sin, sign,
                                  KNW, eps, D, QK_NORM), 0)  # [CW]: the group's kv heads side by side
        v_new = tl.load(V + b64 * s_v + (h0 + ch) * D + dd, mask=cm, other=0.0)
        own_new = sp == SPLITS - 1
        blk = tl.load(BT + b64 * s_bt + pos // BS).to(tl.int64)
        dst = blk * s_cn + (pos % BS) * s_ct + (h0 + ch) * s_ch + dd
        tl.store(KC + dst, k_new, mask=cm & own_new)
        tl.store(VC + dst, v_new, mask=cm & own_new)

        m = tl.full([GP], float("-inf"), tl.float32)
        l = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, CW], tl.float32)
        t = tl.arange(0, TN)
        n_it = tl.cdiv(pos, TN)
        per = tl.cdiv(n_it, SPLITS)
        j_lo = sp * per
        j_hi = tl.minimum(j_lo + per, n_it)
        # the block-table entry of the next iteration is loaded one iteration ahead: the K/V loads of an
        # iteration then do not wait a full memory latency for their block number
        nxt = tl.load(BT + b64 * s_bt + j_lo, mask=(j_lo < j_hi) & (PREFETCH or PIPE), other=0)
        col = (h0 + ch) * s_ch + dd
        if PIPE:  # software pipeline by hand (one cache block per iteration): the next iteration's K/V
            # tiles are loaded into registers before this iteration's math, the table entry two ahead
            row = nxt.to(tl.int64) * s_cn + t * s_ct
            nmask = ((j_lo * TN + t) < pos)[:, None] & cm[None, :] & (j_lo < j_hi)
            kn = tl.load(KC + row[:, None] + col[None, :], mask=nmask, other=0.0)
            vn = tl.load(VC + row[:, None] + col[None, :], mask=nmask, other=0.0)
            nxt = tl.load(BT + b64 * s_bt + j_lo + 1, mask=j_lo + 1 < j_hi, other=0)
        for j in range(j_lo, j_hi):  # cached positions [0, pos), this split's share
            tt = j * TN + t
            valid = tt < pos
            if PIPE:
                kt, vt = kn, vn
                row = nxt.to(tl.int64) * s_cn + t * s_ct
                nmask = (((j + 1) * TN + t) < pos)[:, None] & cm[None, :] & (j + 1 < j_hi)
                kn = tl.load(KC + row[:, None] + col[None, :], mask=nmask, other=0.0)
                vn = tl.load(VC + row[:, None] + col[None, :], mask=nmask, other=0.0)
                nxt = tl.load(BT + b64 * s_bt + j + 2, mask=j + 2 < j_hi, other=0)
            elif NBLK == 1 and PREFETCH:
                cur = nxt
                nxt = tl.load(BT + b64 * s_bt + j + 1, mask=j + 1 < j_hi, other=0)
                row = cur.to(tl.int64) * s_cn + t * s_ct
            elif NBLK == 1:  # one cache block per iteration (TN == BS): one table entry
                cur = tl.load(BT + b64 * s_bt + j)
                row = cur.to(tl.int64) * s_cn + t * s_ct
            elif NBLK == 2:  # two whole blocks per iteration (TN == 2 BS)
                b0 = tl.load(BT + b64 * s_bt + 2 * j).to(tl.int64)
                b1 = tl.load(BT + b64 * s_bt + 2 * j + 1, mask=(2 * j + 1) * BS < pos, other=0).to(tl.int64)
                row = tl.where(t < BS, b0, b1) * s_cn + (t % BS) * s_ct
            else:  # any block size: a table entry per token
                tb = tl.load(BT + b64 * s_bt + tt // BS, mask=valid, other=0).to(tl.int64)
                row = tb * s_cn + (tt % BS) * s_ct
            if PIPE:
                pass
            elif TMA:
                kt = KD.load([cur * BS, h0 * D])
                vt = VD.load([cur * BS, h0 * D])
            else:
                kv_mask = valid[:, None] & cm[None, :]
                kt = tl.load(KC + row[:, None] + col[None, :], mask=kv_mask, other=0.0)
                vt = tl.load(VC + row[:, None] + col[None, :], mask=kv_mask, other=0.0)
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
        if own_new:  # the new token, from registers (q's zero columns pick each row's own head)
            s_n = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale  # [GP]
            m_new = tl.maximum(m, s_n)
            alpha = tl.exp(m - m_new)
            p_n = tl.exp(s_n - m_new)
            l = l * alpha + p_n
            acc = acc * alpha[:, None] + p_n.to(v_new.dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)[None, :]
            m = m_new
        # each row's output is its own head's columns of acc (the other heads' columns are cross terms)
        o_ptr = O + b64 * s_o + (h0 * G + r)[:, None] * D + dd[None, :]
        if SPLITS == 1:
            tl.store(o_ptr, (acc / l[:, None]).to(O.dtype.element_ty), mask=qown)
        else:
            bh = b64 * tl.num_programs(1) + hg
            part = bh * SPLITS + sp
            tl.store(PML + part * 2 * GP + r, m)
            tl.store(PML + part * 2 * GP + GP + r, l)
            tl.store(PACC + part * GP * CW + r[:, None] * CW + c[None, :], acc)
            # release: this split's partials are visible before the count; acquire: the last
            # split sees every other split's partials
            done = tl.atomic_add(CNT + bh, 1, sem="acq_rel")
            if done == SPLITS - 1:
                s_ = tl.arange(0, SP2)
                sm = s_ < SPLITS
                ml = PML + (bh * SPLITS + s_)[:, None] * 2 * GP + r[None, :]
                ms = tl.load(ml, mask=sm[:, None], other=float("-inf"), cache_modifier=".cg")  # [SP2, GP]
                ls = tl.load(ml + GP, mask=sm[:, None], other=0.0, cache_modifier=".cg")
                m_all = tl.max(ms, 0)  # finite: the last split always holds the new token
                w = tl.exp(ms - m_all[None, :])  # empty splits: exp(-inf) = 0
                l_all = tl.sum(w * ls, 0)
                pa = (PACC + (bh * SPLITS + s_)[:, None, None] * GP * CW + r[None, :, None] * CW
                      + c[None, None, :])
                accs = tl.load(pa, mask=sm[:, None, None], other=0.0, cache_modifier=".cg")  # [SP2, GP, CW]
                out = tl.sum(accs * w[:, :, None], 0) / l_all[:, None]
                tl.store(o_ptr, out.to(O.dtype.element_ty), mask=qown)
                tl.atomic_xchg(CNT + bh, 0)

    @triton.jit
    def _rope_store_kernel(Q, K, V, s_q, s_k, s_v, KC, VC, SLOTS, POS, COS, SIN, QNW, KNW, QO, KO, s_qo, s_ko,
                           s_ct, s_ch, eps, HQ: tl.constexpr, HQP: tl.constexpr, HKV: tl.constexpr,
                           HKP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, QK_NORM: tl.constexpr):
        """Prefill: one program per token row, all its heads: q heads RoPE'd into QO; k heads RoPE'd
        into KO and the cache, v into the cache (slot SLOTS[row]; padded rows write the scratch block).
        Head counts are padded to powers of 2 (HQP, HKP); padded rows are masked out."""
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
        x = _rope_tile(Q + r * s_q, hq * D, d, d_rot, qm, d, d_rot, cos, sin, sign, QNW, eps, D, QK_NORM)
        tl.store(QO + r * s_qo + hq[:, None] * D + d[None, :], x, mask=qm)
        hk = tl.arange(0, HKP)
        km = (hk < HKV)[:, None] & dm[None, :]
        hk_ = tl.where(hk < HKV, hk, 0)
        x = _rope_tile(K + r * s_k, hk * D, d, d_rot, km, d, d_rot, cos, sin, sign, KNW, eps, D, QK_NORM)
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
    def _sample_partial_kernel(L, s_l, TEMP, PM, PS, PI, V, NSPLIT,
                               CH: tl.constexpr, BLOCK: tl.constexpr, ANY_GREEDY: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        t = tl.load(TEMP + b)
        t = tl.where(t > 0, t, 1.0)
        start = c * CH
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.full([], 0.0, tl.float32)
        bv = m
        bi = start
        for it in range(0, CH // BLOCK):
            idx = start + it * BLOCK + tl.arange(0, BLOCK)
            x = tl.load(L + b * s_l + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
            z = x / t
            zm = tl.max(z, 0)
            m_new = tl.maximum(m, zm)
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
            if ANY_GREEDY:
                zi = tl.argmax(z, 0, tie_break_left=True)
                better = zm > bv
                bi = tl.where(better, start + it * BLOCK + zi, bi)
                bv = tl.where(better, zm, bv)
        o = b * NSPLIT + c
        tl.store(PM + o, m)
        tl.store(PS + o, s)
        if ANY_GREEDY:
            tl.store(PI + o, bi)

    @triton.jit
    def _sample_final_kernel(L, s_l, TEMP, PM, PS, PI, V, NSPLIT, SEED, STREAM, COUNTER, U,
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
        t = tl.where(t > 0, t, 1.0)
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
        pm_c = tl.sum(tl.where(c == cs_, pm, 0.0), 0)
        r = (target - prev) / tl.exp(pm_c - mx)  # in units of exp(z - pm_c)
        start = cs_ * CH
        run = tl.full([], 0.0, tl.float32)
        found = tl.full([], -1, tl.int32)
        last = start
        for it in range(0, CH // BLOCK):
            idx = start + it * BLOCK + tl.arange(0, BLOCK)
            valid = idx < V
            x = tl.load(L + b * s_l + idx, mask=valid, other=float("-inf")).to(tl.float32)
            e = tl.where(valid, tl.exp(x / t - pm_c), 0.0)
            cum = tl.cumsum(e, 0) + run
            top = tl.max(cum, 0)
            n_le = tl.sum((cum <= r).to(tl.int32), 0)
            hit = (found < 0) & (top > r)
            found = tl.where(hit, start + it * BLOCK + n_le, found)
            last = tl.maximum(last, tl.max(tl.where(e > 0, idx, -1), 0))
            run = top
        tok = tl.where(found >= 0, found, last)
        if ANY_GREEDY:
            pi = tl.load(PI + b * NSPLIT + c, mask=cm, other=0)
            first = tl.min(tl.where(pm == mx, c, NP), 0)
            gt = tl.sum(tl.where(c == first, pi, 0), 0)
            tok = tl.where(greedy, gt, tok)
        xt = tl.load(L + b * s_l + tok).to(tl.float32)
        tl.store(OUT_TOK + b, tok.to(tl.int64))
        tl.store(OUT_LP + b, xt / t - lse)

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
                y_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
                              num_warps=4 if hdim <= 4096 else 8)
    return h, y


def silu_mul(g: torch.Tensor, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    m, n = g.shape
    o = out if out is not None else torch.empty(m, n, dtype=g.dtype, device=g.device)
    block = min(2048, _np2(n))
    _silu_mul_kernel[(m, triton.cdiv(n, block))](g, u, o, n, g.stride(0), u.stride(0), o.stride(0),
                                                  BLOCK=block, num_warps=4)
    return o


# tuned on an H100 for B=256, ctx ~384, GQA 7:1, head_dim 64 (bench/NOTES_generate.md)
ATTN_TOKENS = 64  # tokens per iteration when the block size is not 32/64/128
ATTN_BLOCKS = 1  # else whole cache blocks per iteration (1 or 2)
ATTN_WARPS = 4
ATTN_STAGES = 2
# split (flash-decoding) launches: each program walks a long context, so the next iteration's block-table
# entry is loaded one iteration ahead, with 3 pipeline stages. H200, every layer's cache read once from
# HBM: 16 x 4096 at 8 splits 24.7 -> 19.1 us/layer; at B=256 x 384 (1 split) it costs 1.5%, so it is
# off there (bench/NOTES_generate.md)
ATTN_PREFETCH_TABLE = True
ATTN_STAGES_SPLIT = 3
# kv heads per program at one split (each cache block's K/V one contiguous tile, q block-diagonal) and
# K/V tiles through TMA descriptors (Hopper and later); measured in bench/attention_decode.py
ATTN_KV_PER_PROGRAM = 1
ATTN_TMA = False
ATTN_PIPELINE = False  # next iteration's K/V prefetched into registers by hand (one block per iteration)


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


_DESCRIPTORS: dict[tuple, object] = {}


def _cache_descriptor(cache: torch.Tensor, rows: int, cols: int):
    """TMA descriptor of a [NB, BS, Hkv, D] cache seen as [NB x BS, Hkv x D], [rows, cols] tiles. Kept
    per (address, shape, tile): the caches live for the engine's lifetime (a few dozen of them)."""
    key = (cache.data_ptr(), tuple(cache.shape), cache.dtype, rows, cols)
    desc = _DESCRIPTORS.get(key)
    if desc is None:
        if len(_DESCRIPTORS) >= 256:  # tests create many short-lived caches
            _DESCRIPTORS.pop(next(iter(_DESCRIPTORS)))
        nb, bs, hkv, d = cache.shape
        desc = _DESCRIPTORS[key] = TensorDescriptor.from_tensor(cache.view(nb * bs, hkv * d), [rows, cols])
    return desc


def _tma_ok(device: torch.device) -> bool:
    if TensorDescriptor is None:
        return False
    if device.type != "cuda":
        return True  # the interpreter emulates descriptors
    return torch.cuda.get_device_capability(device)[0] >= 9


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              block_tables: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              num_heads: int, q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
              eps: float = 1e-6, out: torch.Tensor | None = None, tokens: int | None = None,
              num_warps: int | None = None, num_stages: int | None = None, splits: int | None = None,
              workspace: AttentionWorkspace | None = None, kv_per_program: int | None = None,
              tma: bool | None = None, pipeline: bool | None = None) -> torch.Tensor:
    """Decode attention for one new token per row, RoPE and the cache write included.

    q [B, Hq*D], k/v [B, Hkv*D] (rows may be strided views of one qkv buffer; heads contiguous),
    caches [NB, BS, Hkv, D], block_tables [B, MB] int32, pos [B] int32 (the new token's position),
    cos/sin [P, D] float32 tables. Returns [B, Hq*D].

    `splits` (default `attention_splits`) > 1 splits each row's context across that many programs
    and combines them in the kernel; it needs a `workspace` (allocated here when not given: pass
    one when capturing a CUDA graph).

    `kv_per_program` (default `ATTN_KV_PER_PROGRAM` at one split, else 1) kv heads share a program;
    `tma` (default `ATTN_TMA` on Hopper+) loads whole cache blocks through TMA descriptors (needs
    tokens per iteration == block size, head_dim a power of 2 and a contiguous cache)."""
    b = q.shape[0]
    nb, bs, hkv, d = k_cache.shape
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
    kvh = kv_per_program or (ATTN_KV_PER_PROGRAM if splits == 1 else 1)
    if hkv % kvh:
        kvh = 1
    if kvh > 1 and splits > 1 and workspace.gp < max(16, _np2(g * kvh)):
        raise ValueError(f"attention: {kvh} kv heads per program need a workspace for {g * kvh} q rows")
    dp, nblk = max(16, _np2(d)), 1 if tn == bs else (2 if tn == 2 * bs else 0)
    use_tma = (ATTN_TMA and q.is_cuda) if tma is None else tma
    tma_fits = nblk == 1 and dp == d and k_cache.is_contiguous() and v_cache.is_contiguous() and _tma_ok(q.device)
    if tma and not tma_fits:
        raise ValueError("attention: TMA needs tokens per iteration == block size, a power-of-2 head_dim, "
                         "contiguous caches and Triton descriptors on a Hopper (sm90+) GPU")
    use_tma = use_tma and tma_fits
    pipe = (ATTN_PIPELINE if pipeline is None else pipeline) and nblk == 1 and not use_tma
    kd, vd = (_cache_descriptor(k_cache, bs, kvh * d), _cache_descriptor(v_cache, bs, kvh * d)) if use_tma else (k_cache, v_cache)
    ws = (workspace.ml, workspace.acc, workspace.count) if splits > 1 else (o, o, o)
    _attention_kernel[(b, hkv // kvh, splits)](
        q, k, v, q.stride(0), k.stride(0), v.stride(0), k_cache, v_cache, kd, vd, block_tables, pos, cos, sin,
        q_norm if qk_norm else q, k_norm if qk_norm else q, o, o.stride(0),
        block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), d ** -0.5, eps, *ws,
        G=g, GP=max(16, _np2(g * kvh)), D=d, DP=dp, BS=bs, TN=tn, QK_NORM=qk_norm,
        IEEE=q.dtype == torch.float32, NBLK=nblk, KVH=kvh, TMA=use_tma, PIPE=pipe,
        SPLITS=splits, SP2=max(2, _np2(splits)), PREFETCH=ATTN_PREFETCH_TABLE and splits > 1,
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


SAMPLE_CFG = (4096, 2, 8)  # first pass: logits per load, loads per program, warps (H100: 54 us vs 64 for 2048x4)


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
    pi = torch.empty(b, nsplit, dtype=torch.int32, device=dev)
    tok = out_tokens if out_tokens is not None else torch.empty(b, dtype=torch.int64, device=dev)
    lp = out_logprobs if out_logprobs is not None else torch.empty(b, dtype=torch.float32, device=dev)
    _sample_partial_kernel[(b, nsplit)](logits, logits.stride(0), temperature, pm, ps, pi, vocab, nsplit,
                                        CH=ch, BLOCK=block, ANY_GREEDY=any_greedy, num_warps=warps)
    _sample_final_kernel[(b,)](logits, logits.stride(0), temperature, pm, ps, pi, vocab, nsplit, seed, stream,
                               counter, u if u is not None else temperature, tok, lp, CH=ch, BLOCK=block,
                               NP=max(2, _np2(nsplit)), ANY_GREEDY=any_greedy, HAS_U=u is not None, num_warps=8)
    return tok, lp


def advance(tok_in: torch.Tensor, pos: torch.Tensor, counter: torch.Tensor, out_tokens: torch.Tensor, n: int) -> None:
    _advance_kernel[(triton.cdiv(n, 256),)](tok_in, pos, counter, out_tokens, n, num_warps=4)
