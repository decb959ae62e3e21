"""Triton forward/backward of kernels.compressed_attention (imported lazily; the contract is in that module).

Tiling. Forward and dq: one program per (block of BLOCK_M queries, batch row b, head h); it walks the keys of row b
only (jagged: offsets[b] .. offsets[b+1], no padding to the longest row) in blocks of BLOCK_N, up to the largest
limit of its queries, with an online (flash) softmax in base 2 and fp32 accumulators. dk/dv: one program per
(block of BLOCK_N keys, b, h); programs past the row's end return at once; each walks all Nq queries (few).
The log-sum-exp of the forward (base 2) and delta = rowsum(dO * O) let the backward recompute probabilities.

Masking. Query j of row b sees merged positions p < limit_j = min(L_b, q_limit[b, j]) (negative -> L_b). Invisible
scores are -inf before the max, so a query that sees nothing keeps m = -1e30, l = 0 and writes 0; its probabilities
are 0 in the backward (lse = +inf and an explicit where), so its gradients are 0, never NaN.

Fused merge (MERGE = K > 1): k/v hold raw events; merged position p is the mean of events [pK, min(pK+K, E_b)),
summed in fp32 while loading the tile (K unrolled loads); the backward spreads d(merged)/count over those events.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._common import block, empty
from kernels._triton_common import _dot, dot_precision

LOG2E = 1.4426950408889634


@triton.jit
def _load_kv(base, offs_n, n_ev, offs_d, d_mask, stride_n, stride_d, MERGE: tl.constexpr):
    """[BLOCK_N, BLOCK_D] tile of merged positions offs_n of one row (base = its first event, head applied)."""
    if MERGE == 1:
        mask = (offs_n < n_ev)[:, None] & d_mask[None, :]
        return tl.load(base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask, other=0.0)
    acc = tl.zeros((offs_n.shape[0], offs_d.shape[0]), dtype=tl.float32)
    for kk in tl.static_range(MERGE):
        ev = offs_n * MERGE + kk
        mask = (ev < n_ev)[:, None] & d_mask[None, :]
        x = tl.load(base + ev[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask, other=0.0)
        acc += x.to(tl.float32)
    cnt = tl.minimum(n_ev - offs_n * MERGE, MERGE)
    acc = acc / tl.maximum(cnt, 1).to(tl.float32)[:, None]
    return acc.to(base.dtype.element_ty)


@triton.jit
def _store_dkv(base, val, offs_n, n_ev, offs_d, d_mask, stride_n, stride_d, MERGE: tl.constexpr):
    """Write the gradient of merged positions offs_n back to their (raw) events: d(event) = d(merged) / count."""
    if MERGE == 1:
        mask = (offs_n < n_ev)[:, None] & d_mask[None, :]
        tl.store(base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d, val.to(base.dtype.element_ty),
                 mask=mask)
    else:
        cnt = tl.maximum(tl.minimum(n_ev - offs_n * MERGE, MERGE), 1).to(tl.float32)
        val = (val / cnt[:, None]).to(base.dtype.element_ty)
        for kk in tl.static_range(MERGE):
            ev = offs_n * MERGE + kk
            mask = (ev < n_ev)[:, None] & d_mask[None, :]
            tl.store(base + ev[:, None] * stride_n + offs_d[None, :] * stride_d, val, mask=mask)


@triton.jit
def _limits(LIM, b, offs_m, m_mask, n_q, seq_len, HAS_LIMIT: tl.constexpr):
    """Per-query number of visible merged positions, in [0, seq_len]; 0 for padding queries of the block."""
    if HAS_LIMIT:
        lim = tl.load(LIM + b * n_q + offs_m, mask=m_mask, other=0)
        lim = tl.where(lim < 0, seq_len, tl.minimum(lim, seq_len))
    else:
        lim = tl.zeros_like(offs_m).to(tl.int64) + seq_len
    return tl.where(m_mask, lim, 0)


@triton.jit
def _fwd_kernel(Q, K, V, OFF, LIM, O, O32, LSE,
                sq_b, sq_m, sq_h, sq_d, sk_n, sk_h, sk_d, sv_n, sv_h, sv_d, so_b, so_m, so_h, so_d,
                n_q, n_heads, head_dim, qk_scale,
                HAS_LIMIT: tl.constexpr, MERGE: tl.constexpr, PREC: tl.constexpr, SAVE_O32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    ev_start = tl.load(OFF + b)
    n_ev = tl.load(OFF + b + 1) - ev_start
    seq_len = (n_ev + MERGE - 1) // MERGE  # merged length of row b
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < n_q
    d_mask = offs_d < head_dim
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    limit = _limits(LIM, b, offs_m, m_mask, n_q, seq_len, HAS_LIMIT)
    hi = tl.max(limit, 0)  # no query of this block sees past hi: stop there
    k_base = K + ev_start * sk_n + h * sk_h
    v_base = V + ev_start * sv_n + h * sv_h

    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)  # finite: exp2(m_i - m_new) stays defined
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_kv(k_base, offs_n, n_ev, offs_d, d_mask, sk_n, sk_d, MERGE)
        s = _dot(q, tl.trans(k), None, PREC) * qk_scale
        s = tl.where(offs_n[None, :] < limit[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv(v_base, offs_n, n_ev, offs_d, d_mask, sv_n, sv_d, MERGE)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PREC)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # nothing visible: acc = 0 -> output 0
    out = acc / l_safe[:, None]
    o_off = b * so_b + h * so_h + offs_m[:, None] * so_m + offs_d[None, :] * so_d
    tl.store(O + o_off, out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    if SAVE_O32:  # unrounded copy for the backward's delta (queries are few, so this buffer is small)
        tl.store(O32 + o_off, out, mask=m_mask[:, None] & d_mask[None, :])
    # +inf for a query that sees nothing: its probabilities exp2(s - lse) are then exactly 0 in the backward
    tl.store(LSE + pid_bh * n_q + offs_m, tl.where(l_i > 0, m_i + tl.log2(l_safe), float("inf")), mask=m_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, OFF, LIM, DO, LSE, DELTA, DQ,
                   sq_b, sq_m, sq_h, sq_d, sk_n, sk_h, sk_d, sv_n, sv_h, sv_d,
                   n_q, n_heads, head_dim, qk_scale, sm_scale,
                   HAS_LIMIT: tl.constexpr, MERGE: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # dO and dQ share q's [B, Nq, H, d] strides (the wrapper makes them contiguous).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    ev_start = tl.load(OFF + b)
    n_ev = tl.load(OFF + b + 1) - ev_start
    seq_len = (n_ev + MERGE - 1) // MERGE
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < n_q
    d_mask = offs_d < head_dim
    qmask = m_mask[:, None] & d_mask[None, :]
    q_off = b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d
    q = tl.load(Q + q_off, mask=qmask, other=0.0)
    do = tl.load(DO + q_off, mask=qmask, other=0.0)
    lse = tl.load(LSE + pid_bh * n_q + offs_m, mask=m_mask, other=0.0)
    delta = tl.load(DELTA + pid_bh * n_q + offs_m, mask=m_mask, other=0.0)
    limit = _limits(LIM, b, offs_m, m_mask, n_q, seq_len, HAS_LIMIT)
    hi = tl.max(limit, 0)
    k_base = K + ev_start * sk_n + h * sk_h
    v_base = V + ev_start * sv_n + h * sv_h
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_kv(k_base, offs_n, n_ev, offs_d, d_mask, sk_n, sk_d, MERGE)
        v = _load_kv(v_base, offs_n, n_ev, offs_d, d_mask, sv_n, sv_d, MERGE)
        s = _dot(q, tl.trans(k), None, PREC) * qk_scale
        p = tl.exp2(tl.where(offs_n[None, :] < limit[:, None], s - lse[:, None], float("-inf")))
        dp = _dot(do, tl.trans(v), None, PREC)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, PREC)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=qmask)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, OFF, LIM, DO, LSE, DELTA, DK, DV,
                     sq_b, sq_m, sq_h, sq_d, sk_n, sk_h, sk_d, sv_n, sv_h, sv_d,
                     n_q, n_heads, head_dim, qk_scale, sm_scale,
                     HAS_LIMIT: tl.constexpr, MERGE: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # dK/dV share k/v's strides (the wrapper allocates them like k and v); dO shares q's.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    ev_start = tl.load(OFF + b)
    n_ev = tl.load(OFF + b + 1) - ev_start
    seq_len = (n_ev + MERGE - 1) // MERGE
    start_n = pid_n * BLOCK_N
    if start_n >= seq_len:  # the grid covers the longest row; shorter rows have nothing here
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    k_base = K + ev_start * sk_n + h * sk_h
    v_base = V + ev_start * sv_n + h * sv_h
    k = _load_kv(k_base, offs_n, n_ev, offs_d, d_mask, sk_n, sk_d, MERGE)
    v = _load_kv(v_base, offs_n, n_ev, offs_d, d_mask, sv_n, sv_d, MERGE)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start_m in range(0, n_q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < n_q
        qmask = m_mask[:, None] & d_mask[None, :]
        q_off = b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d
        q = tl.load(Q + q_off, mask=qmask, other=0.0)
        do = tl.load(DO + q_off, mask=qmask, other=0.0)
        lse = tl.load(LSE + pid_bh * n_q + offs_m, mask=m_mask, other=0.0)
        delta = tl.load(DELTA + pid_bh * n_q + offs_m, mask=m_mask, other=0.0)
        limit = _limits(LIM, b, offs_m, m_mask, n_q, seq_len, HAS_LIMIT)
        s = _dot(q, tl.trans(k), None, PREC) * qk_scale  # [BLOCK_M, BLOCK_N]
        p = tl.exp2(tl.where(offs_n[None, :] < limit[:, None], s - lse[:, None], float("-inf")))
        dv = _dot(tl.trans(p.to(do.dtype)), do, dv, PREC)
        dp = _dot(do, tl.trans(v), None, PREC)
        ds = p * (dp - delta[:, None])
        dk = _dot(tl.trans(ds.to(q.dtype)), q, dk, PREC)
    _store_dkv(DK + ev_start * sk_n + h * sk_h, dk * sm_scale, offs_n, n_ev, offs_d, d_mask, sk_n, sk_d, MERGE)
    _store_dkv(DV + ev_start * sv_n + h * sv_h, dv, offs_n, n_ev, offs_d, d_mask, sv_n, sv_d, MERGE)


def _blocks(n_q: int, d: int) -> tuple[int, int, int, int]:
    """BLOCK_M (queries), BLOCK_N (keys), BLOCK_D (head dim, padded to a power of two) and num_warps."""
    bd = block(d, 256)
    bm = block(n_q, 64)
    bn = 64 if bd <= 64 else 32  # keep the K/V tiles and the [M, N] scores within registers at d=128
    return bm, bn, bd, 4


class CompressedAttentionFn(torch.autograd.Function):
    """Autograd wrapper: q [B,Nq,H,d], k/v [N,H,d] (raw events when merge > 1), offsets [B+1] int64."""

    @staticmethod
    def forward(ctx, q, k, v, offsets, q_limit, scale, merge):
        b, n_q, n_heads, d = q.shape
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        offsets = offsets.to(torch.int64).contiguous()
        lim = q_limit.to(device=q.device, dtype=torch.int64).contiguous() if q_limit is not None else offsets
        out = empty(tuple(q.shape), q.dtype, q.device)
        # delta = rowsum(dO * O) from the bf16/fp16-rounded O costs a rounding error of O that the backward turns
        # into noise in dq of the size of dq itself when a query sees one key (dq = 0 exactly); keep O in fp32.
        save_o32 = q.dtype != torch.float32 and any(ctx.needs_input_grad[:3])
        out32 = empty(tuple(q.shape), torch.float32, q.device) if save_o32 else out
        lse = empty((b, n_heads, n_q), torch.float32, q.device)
        bm, bn, bd, warps = _blocks(n_q, d)
        if b * n_q * n_heads and k.shape[0] == 0:  # no keys anywhere: every query sees nothing
            out.zero_()
            out32.zero_()
            lse.fill_(float("inf"))
        elif b * n_q * n_heads:
            grid = (triton.cdiv(n_q, bm), b * n_heads)
            _fwd_kernel[grid](q, k, v, offsets, lim, out, out32, lse, *q.stride(), *k.stride(), *v.stride(),
                              *out.stride(), n_q, n_heads, d, scale * LOG2E, HAS_LIMIT=q_limit is not None, MERGE=merge,
                              PREC=dot_precision(q.dtype), SAVE_O32=save_o32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
                              num_warps=warps)
        ctx.save_for_backward(q, k, v, offsets, lim, out32, lse)
        ctx.scale, ctx.merge, ctx.has_limit = scale, merge, q_limit is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, offsets, lim, out, lse = ctx.saved_tensors
        b, n_q, n_heads, d = q.shape
        dout = dout.contiguous()
        # delta_j = sum_d dO * O: tiny ([B, H, Nq]); plain torch in fp32
        delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
        dq = empty(tuple(q.shape), q.dtype, q.device)
        dk = empty(tuple(k.shape), k.dtype, k.device)
        dv = empty(tuple(v.shape), v.dtype, v.device)
        if k.shape[0] == 0 or b * n_q * n_heads == 0:
            dq.zero_()
            dk.zero_()
            dv.zero_()
            return dq, dk, dv, None, None, None, None
        bm, bn, bd, warps = _blocks(n_q, d)
        args = (*q.stride(), *k.stride(), *v.stride(), n_q, n_heads, d, ctx.scale * LOG2E, ctx.scale)
        meta = dict(HAS_LIMIT=ctx.has_limit, MERGE=ctx.merge, PREC=dot_precision(q.dtype), BLOCK_M=bm, BLOCK_N=bn,
                    BLOCK_D=bd, num_warps=warps)
        _bwd_dq_kernel[(triton.cdiv(n_q, bm), b * n_heads)](q, k, v, offsets, lim, dout, lse, delta, dq, *args, **meta)
        lengths = offsets[1:] - offsets[:-1]
        max_len = int((lengths.max() + ctx.merge - 1) // ctx.merge)  # one host sync: the grid covers the longest row
        grid = (max(triton.cdiv(max_len, bn), 1), b * n_heads)
        _bwd_dkdv_kernel[grid](q, k, v, offsets, lim, dout, lse, delta, dk, dv, *args, **meta)
        return dq, dk, dv, None, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
              q_limit: torch.Tensor | None, scale: float | None, merge: int) -> torch.Tensor:
    """Entry point used by the dispatch (k/v cast to q's dtype outside the Function so autograd maps grads back)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return CompressedAttentionFn.apply(q, k.to(q.dtype), v.to(q.dtype), offsets, q_limit, float(scale), int(merge))
