"""Causal cross-attention of a few queries over a jagged, compressed (token-merged) long history (LONGER).

    out = compressed_attention(q, k, v, offsets, q_limit=None, scale=None, merge_k=1, backend="auto")
      q       [B, Nq, H, d]   queries (global tokens + the most recent merged tokens)
      k, v    [N, H, d]       jagged history, row b at [offsets[b], offsets[b+1]); already merged when merge_k == 1,
                              raw events when merge_k = K > 1 (then merged on the fly, see below)
      offsets [B+1] int64     row offsets into k/v (event offsets when merge_k > 1)
      q_limit [B, Nq] int     query j of row b sees merged positions p < q_limit[b, j]. A negative value, or any value
                              >= the row's merged length L_b (e.g. torch.iinfo(int64).max), means "the whole history";
                              0 means "nothing". None = the whole history for every query.
      scale   float           score scale, default 1/sqrt(d)
    -> [B, Nq, H, d] in q's dtype; a query that sees no position outputs zeros (and gets zero gradients), never NaN.

Token merge (merge_k = K > 1): merged position p of row b is the mean of its events [pK, min(pK + K, E_b)) (the last
group may be partial), so L_b = ceil(E_b / K). Merging K/V by mean equals merging the event embeddings before a
linear K/V projection (a mean commutes with an affine map). The Triton kernel does the merge inside its K/V loads
(no merged copy in memory); the reference calls `merge_mean` first. Only the mean merge is fused; a learned linear
merge must be applied by the caller before the call (with merge_k=1).

Dispatch: backend="auto" runs the Triton kernel on CUDA tensors when Triton is installed, the PyTorch reference
elsewhere; "triton" forces Triton (on CPU only under TRITON_INTERPRET=1), "reference" forces the reference.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch

BACKENDS = ("auto", "triton", "reference")


def _padded(x: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged [N, ...] -> padded [B, Lmax, ...] and a [B, Lmax] validity mask."""
    lengths = offsets[1:] - offsets[:-1]
    b = lengths.numel()
    lmax = int(lengths.max()) if b else 0
    pos = torch.arange(lmax, device=x.device)
    mask = pos.unsqueeze(0) < lengths.unsqueeze(1)
    idx = (offsets[:-1].unsqueeze(1) + pos).clamp(max=max(x.shape[0] - 1, 0))
    out = x[idx] if x.shape[0] else x.new_zeros((b, lmax, *x.shape[1:]))
    return out * mask.view(b, lmax, *([1] * (x.dim() - 1))).to(x.dtype), mask


def visible_lengths(offsets: torch.Tensor, q_limit: torch.Tensor | None, n_q: int, merge_k: int = 1) -> torch.Tensor:
    """Number of merged positions each query sees, [B, Nq] int64 (q_limit semantics of the module docstring)."""
    lengths = (offsets[1:] - offsets[:-1] + merge_k - 1) // merge_k
    full = lengths.unsqueeze(1).expand(-1, n_q)
    if q_limit is None:
        return full.clone()
    lim = q_limit.to(torch.int64)
    return torch.where(lim < 0, full, torch.minimum(lim, full))


def compressed_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
                                   q_limit: torch.Tensor | None = None, scale: float | None = None,
                                   merge_k: int = 1) -> torch.Tensor:
    """PyTorch reference (pads to the longest row, masks, computes in fp32 at least, returns q's dtype)."""
    dtype = q.dtype
    acc = torch.promote_types(dtype, torch.float32)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    k, v = k.to(acc), v.to(acc)
    n_off = offsets
    if merge_k > 1:
        k, n_off = merge_mean(k, offsets, merge_k)
        v, _ = merge_mean(v, offsets, merge_k)
    kp, mask = _padded(k, n_off)  # [B, L, H, d]
    vp, _ = _padded(v, n_off)
    scores = torch.einsum("bqhd,blhd->bhql", q.to(acc), kp) * scale
    n_vis = visible_lengths(n_off, q_limit, q.shape[1])  # [B, Nq], <= the row length, so it implies `mask`
    pos = torch.arange(mask.shape[1], device=q.device)
    visible = (pos.view(1, 1, -1) < n_vis.unsqueeze(-1)).unsqueeze(1)  # [B, 1, Nq, L]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with nothing visible -> all-zero weights
    return torch.einsum("bhql,blhd->bqhd", probs, vp).to(dtype)


def compressed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
                         q_limit: torch.Tensor | None = None, scale: float | None = None, merge_k: int = 1,
                         backend: str = "auto") -> torch.Tensor:
    """Jagged causal cross-attention with autograd (optionally over a mean-merged history); see the module
    docstring for shapes and masking. backend: 'auto' | 'triton' | 'reference'."""
    if q.dim() != 4 or k.dim() != 3 or k.shape != v.shape or k.shape[1:] != q.shape[2:]:
        raise ValueError(f"shapes: q [B,Nq,H,d], k=v [N,H,d]; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if offsets.numel() != q.shape[0] + 1:
        raise ValueError(f"offsets must have B+1={q.shape[0] + 1} entries, got {offsets.numel()}")
    if q_limit is not None and tuple(q_limit.shape) != tuple(q.shape[:2]):
        raise ValueError(f"q_limit must be [B, Nq]={tuple(q.shape[:2])}, got {tuple(q_limit.shape)}")
    if merge_k < 1:
        raise ValueError(f"merge_k must be >= 1, got {merge_k}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "reference" or (backend == "auto" and not (q.is_cuda and _triton_available())):
        return compressed_attention_reference(q, k, v, offsets, q_limit, scale, merge_k)
    from kernels._triton_compressed_attention import attention

    return attention(q, k, v, offsets, q_limit, scale, merge_k)


def merge_mean(x: torch.Tensor, offsets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each K adjacent events per row: [N, ...] -> ([M, ...], merged offsets [B+1]); M = sum ceil(L_i/K)."""
    lengths = offsets[1:] - offsets[:-1]
    merged_len = (lengths + k - 1) // k
    m_off = torch.zeros_like(offsets)
    torch.cumsum(merged_len, 0, out=m_off[1:])
    row = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths, output_size=x.shape[0])
    group = m_off[row] + (torch.arange(x.shape[0], device=x.device) - offsets[row]) // k
    total = int(m_off[-1])
    sums = x.new_zeros((total, *x.shape[1:])).index_add_(0, group, x)
    ones = torch.ones_like(group, dtype=x.dtype)
    counts = torch.zeros(total, dtype=x.dtype, device=x.device).index_add_(0, group, ones)
    return sums / counts.clamp(min=1).view(-1, *([1] * (x.dim() - 1))), m_off


@functools.cache
def _triton_available() -> bool:
    """Triton installed (checked once)."""
    return importlib.util.find_spec("triton") is not None
