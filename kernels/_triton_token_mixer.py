"""Triton forward/backward of kernels.token_mixer (imported lazily; the contract is in that module).

Mixing in the index arithmetic. With dh = D / T, channel c of mixed token t is x[b, c // dh, t * dh + c % dh]
(`_mix_off`); the same permutation writes the reverted output and reads the upstream gradient, so no mixed or
transposed copy of x, y or dy is ever made.

Kernels (each one launch with the token index in grid axis 2, so all T per-token GEMMs run together):
  _gate_up_kernel  [BLOCK_M samples, BLOCK_F hidden] tile of token t: g = m Wg, u = m Wu accumulated in fp32 over
                   D in BLOCK_K steps, epilogue h = silu(g) * u. With BWD it also accumulates dh = dm_out Wout^T over
                   the same K loop (dm_out: the mixed upstream gradient) and writes dg, du (h is recomputed, not
                   saved by the forward).
  _down_kernel     out[b, mix(t, n)] = sum_k A[b, t, k] W[t, k, n]: the forward's h @ Wout (stored reverted) and
                   the backward's dx = [dg | du] @ W_in^T (stored un-mixed), W read through strides.
  _wgrad_kernel    dW[t, i, j] = sum_b A[b, t, i] G[b, t, j], reducing over the batch in BLOCK_K steps; A or G is
                   read through the mix permutation (dW_in = m^T [dg | du], dW_out = h^T dm_out).
Tiles past a dimension's end are masked (loads give 0, stores are skipped), so D, F and B need not be multiples of
the block sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import block, empty
from kernels._triton_common import _dot, dot_precision


@triton.jit
def _mix_off(t, c, dh, stride_t, stride_d):
    """Offset of channel c of mixed token t inside an un-mixed [., T, D] tensor: [c // dh, t * dh + c % dh]."""
    return (c // dh) * stride_t + (t * dh + c % dh) * stride_d


@triton.jit
def _gate_up_kernel(X, WIN, DY, WOUT, H, DGU,
                    n_b, n_d, n_f, dh,
                    sx_b, sx_t, sx_d, sw_t, sw_d, sw_f, sy_b, sy_t, sy_d, so_t, so_f, so_d,
                    sh_b, sh_t, sh_f, sg_b, sg_t, sg_f,
                    BWD: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_f = tl.program_id(1)
    t = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    m_mask = offs_m < n_b
    f_mask = offs_f < n_f
    acc_g = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    acc_dh = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    for k0 in range(0, n_d, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < n_d
        mk = m_mask[:, None] & k_mask[None, :]
        kf = k_mask[:, None] & f_mask[None, :]
        xm = tl.load(X + offs_m[:, None] * sx_b + _mix_off(t, offs_k, dh, sx_t, sx_d)[None, :], mask=mk, other=0.0)
        w_off = WIN + t * sw_t + offs_k[:, None] * sw_d + offs_f[None, :] * sw_f
        acc_g = _dot(xm, tl.load(w_off, mask=kf, other=0.0), acc_g, PREC)
        acc_u = _dot(xm, tl.load(w_off + n_f * sw_f, mask=kf, other=0.0), acc_u, PREC)
        if BWD:
            dym = tl.load(DY + offs_m[:, None] * sy_b + _mix_off(t, offs_k, dh, sy_t, sy_d)[None, :], mask=mk,
                          other=0.0)
            wo_t = tl.load(WOUT + t * so_t + offs_f[None, :] * so_f + offs_k[:, None] * so_d, mask=kf, other=0.0)
            acc_dh = _dot(dym, wo_t, acc_dh, PREC)
    sig = tl.sigmoid(acc_g)
    silu = acc_g * sig
    mf = m_mask[:, None] & f_mask[None, :]
    tl.store(H + offs_m[:, None] * sh_b + t * sh_t + offs_f[None, :] * sh_f, (silu * acc_u).to(H.dtype.element_ty),
             mask=mf)
    if BWD:
        dg = acc_dh * acc_u * sig * (1.0 + acc_g * (1.0 - sig))  # d silu(g) / dg = sig * (1 + g (1 - sig))
        du = acc_dh * silu
        g_off = DGU + offs_m[:, None] * sg_b + t * sg_t + offs_f[None, :] * sg_f
        tl.store(g_off, dg.to(DGU.dtype.element_ty), mask=mf)
        tl.store(g_off + n_f * sg_f, du.to(DGU.dtype.element_ty), mask=mf)


@triton.jit
def _down_kernel(A, W, OUT, n_b, n_k, n_n, dh,
                 sa_b, sa_t, sa_k, sw_t, sw_k, sw_n, so_b, so_t, so_d,
                 PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < n_b
    n_mask = offs_n < n_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_k, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < n_k
        a = tl.load(A + offs_m[:, None] * sa_b + t * sa_t + offs_k[None, :] * sa_k,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(W + t * sw_t + offs_k[:, None] * sw_k + offs_n[None, :] * sw_n,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _dot(a, w, acc, PREC)
    tl.store(OUT + offs_m[:, None] * so_b + _mix_off(t, offs_n, dh, so_t, so_d)[None, :],
             acc.to(OUT.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _wgrad_kernel(A, G, DW, n_b, n_i, n_j, dh,
                  sa_b, sa_t, sa_i, sg_b, sg_t, sg_j, sw_t, sw_i, sw_j,
                  A_MIX: tl.constexpr, G_MIX: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    t = tl.program_id(2)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_mask = offs_i < n_i
    j_mask = offs_j < n_j
    if A_MIX:
        a_col = _mix_off(t, offs_i, dh, sa_t, sa_i)
    else:
        a_col = t * sa_t + offs_i * sa_i
    if G_MIX:
        g_col = _mix_off(t, offs_j, dh, sg_t, sg_j)
    else:
        g_col = t * sg_t + offs_j * sg_j
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for k0 in range(0, n_b, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < n_b
        a_t = tl.load(A + offs_k[None, :] * sa_b + a_col[:, None], mask=i_mask[:, None] & k_mask[None, :], other=0.0)
        g = tl.load(G + offs_k[:, None] * sg_b + g_col[None, :], mask=k_mask[:, None] & j_mask[None, :], other=0.0)
        acc = _dot(a_t, g, acc, PREC)
    tl.store(DW + t * sw_t + offs_i[:, None] * sw_i + offs_j[None, :] * sw_j, acc.to(DW.dtype.element_ty),
             mask=i_mask[:, None] & j_mask[None, :])


# Tile caps: 128x128 output tiles with K steps of 64 (bf16: 2 x 16 KiB operand tiles per stage) are the usual
# good point for H100 GEMMs; small dimensions shrink the tile to their next power of two (at least 16).
_CAP_MN, _CAP_K, _WARPS, _STAGES = 128, 64, 8, 3


def _cfg(m: int, n: int, k: int) -> dict:
    return dict(BM=block(m, _CAP_MN), BN=block(n, _CAP_MN), BK=block(k, _CAP_K))


def _gate_up(x, w_in, w_out, dy):
    """h [B, T, F] (and [dg | du] [B, T, 2F] when dy is given)."""
    b, t, d = x.shape
    f = w_in.shape[2] // 2
    h = empty((b, t, f), x.dtype, x.device)
    dgu = empty((b, t, 2 * f), x.dtype, x.device) if dy is not None else h
    c = _cfg(b, f, d)
    grid = (triton.cdiv(b, c["BM"]), triton.cdiv(f, c["BN"]), t)
    dy_ = dy if dy is not None else x  # placeholder, unused by the forward (BWD=False)
    _gate_up_kernel[grid](x, w_in, dy_, w_out, h, dgu, b, d, f, d // t, *x.stride(), *w_in.stride(), *dy_.stride(),
                          *w_out.stride(),
                          *h.stride(), *dgu.stride(), BWD=dy is not None, PREC=dot_precision(x.dtype),
                          BLOCK_M=c["BM"], BLOCK_F=c["BN"], BLOCK_K=c["BK"], num_warps=_WARPS, num_stages=_STAGES)
    return h, dgu


def _down(a, w_strides, w, n_out, out_shape, dtype):
    """out (un-mixed [B, T, D]) with out[b, mix(t, n)] = sum_k a[b, t, k] w[t, k, n] (w read via w_strides)."""
    b, t, k = a.shape
    out = empty(out_shape, dtype, a.device)
    c = _cfg(b, n_out, k)
    grid = (triton.cdiv(b, c["BM"]), triton.cdiv(n_out, c["BN"]), t)
    _down_kernel[grid](a, w, out, b, k, n_out, out_shape[2] // t, *a.stride(), *w_strides, *out.stride(),
                       PREC=dot_precision(a.dtype), BLOCK_M=c["BM"], BLOCK_N=c["BN"], BLOCK_K=c["BK"],
                       num_warps=_WARPS, num_stages=_STAGES)
    return out


def _wgrad(a, a_mix, g, g_mix, n_i, n_j, dh, dtype):
    """dW [T, n_i, n_j] = sum_b a[b, t, i] g[b, t, j] (a / g read through the mix permutation when *_mix)."""
    b, t = a.shape[:2]
    dw = empty((t, n_i, n_j), dtype, a.device)
    c = _cfg(n_i, n_j, b)
    grid = (triton.cdiv(n_i, c["BM"]), triton.cdiv(n_j, c["BN"]), t)
    _wgrad_kernel[grid](a, g, dw, b, n_i, n_j, dh, *a.stride(), *g.stride(), *dw.stride(), A_MIX=a_mix, G_MIX=g_mix,
                        PREC=dot_precision(a.dtype), BLOCK_I=c["BM"], BLOCK_J=c["BN"], BLOCK_K=c["BK"],
                        num_warps=_WARPS, num_stages=_STAGES)
    return dw


class TokenMixerFn(torch.autograd.Function):
    """Autograd wrapper: x [B, T, D], w_in [T, D, 2F], w_out [T, F, D], all of one dtype."""

    @staticmethod
    def forward(ctx, x, w_in, w_out):
        x, w_in, w_out = x.contiguous(), w_in.contiguous(), w_out.contiguous()
        ctx.save_for_backward(x, w_in, w_out)
        if x.numel() == 0 or w_out.shape[1] == 0:  # B = 0 or F = 0: nothing to launch
            return torch.zeros_like(x)
        h, _ = _gate_up(x, w_in, w_out, None)
        return _down(h, w_out.stride(), w_out, x.shape[2], tuple(x.shape), x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w_in, w_out = ctx.saved_tensors
        b, t, d = x.shape
        f = w_out.shape[1]
        if x.numel() == 0 or f == 0:
            return torch.zeros_like(x), torch.zeros_like(w_in), torch.zeros_like(w_out)
        dy = dy.contiguous()
        h, dgu = _gate_up(x, w_in, w_out, dy)  # recompute h; dg, du from dh = mix(dy) @ Wout^T
        dx = dw_in = dw_out = None
        if ctx.needs_input_grad[0]:  # dm = [dg | du] @ W_in^T, stored un-mixed (= dx)
            s = w_in.stride()
            dx = _down(dgu, (s[0], s[2], s[1]), w_in, d, (b, t, d), x.dtype)
        if ctx.needs_input_grad[1]:
            dw_in = _wgrad(x, True, dgu, False, d, 2 * f, d // t, w_in.dtype)
        if ctx.needs_input_grad[2]:
            dw_out = _wgrad(h, False, dy, True, f, d, d // t, w_out.dtype)
        return dx, dw_in, dw_out


def token_mixer(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """Entry point used by the dispatch (weights cast to x's dtype outside the Function so autograd maps grads)."""
    return TokenMixerFn.apply(x, w_in.to(x.dtype), w_out.to(x.dtype))
