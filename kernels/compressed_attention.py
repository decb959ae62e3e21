"""Causal cross-attention of a few queries over a jagged, compressed (token-merged) long history (LONGER).

    out = compressed_attention(q, k, v, offsets, q_limit=None, scale=None)
      q       [B, Nq, H, d]   queries (global tokens + the most recent merged tokens)
      k, v    [N, H, d]       jagged merged history, rows b at [offsets[b], offsets[b+1])
      offsets [B+1] int64
      q_limit [B, Nq] int     query j of row b sees history positions p < q_limit[b, j]; any value >= the row's
                              length (e.g. torch.iinfo(int64).max) means "the whole history"; None = all for all
    -> [B, Nq, H, d]; a query that sees no position outputs zeros (and gets zero gradients), never NaN.

`merge_mean` is the mean token merge of K adjacent events (last group partial), the reference of the fused merge.
Dispatch: backend="auto" uses the Triton kernel on CUDA tensors when it is available, the reference elsewhere.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch


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


def compressed_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
                                   q_limit: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """PyTorch reference (pads to the longest row, masks, computes in fp32 at least, returns q's dtype)."""
    dtype = q.dtype
    acc = torch.promote_types(dtype, torch.float32)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    kp, mask = _padded(k.to(acc), offsets)  # [B, L, H, d]
    vp, _ = _padded(v.to(acc), offsets)
    scores = torch.einsum("bqhd,blhd->bhql", q.to(acc), kp) * scale
    visible = mask[:, None, None, :]  # [B, 1, 1, L]
    if q_limit is not None:
        pos = torch.arange(mask.shape[1], device=q.device)
        visible = visible & (pos.view(1, 1, -1) < q_limit.unsqueeze(-1)).unsqueeze(1)  # [B, 1, Nq, L]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with nothing visible -> all-zero weights
    return torch.einsum("bhql,blhd->bqhd", probs, vp).to(dtype)


def compressed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
                         q_limit: torch.Tensor | None = None, scale: float | None = None,
                         backend: str = "auto") -> torch.Tensor:
    """Jagged causal cross-attention with autograd; backend: 'auto' | 'triton' | 'reference'."""
    if q.dim() != 4 or k.dim() != 3 or k.shape != v.shape or k.shape[1:] != q.shape[2:]:
        raise ValueError(f"shapes: q [B,Nq,H,d], k=v [N,H,d]; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if offsets.numel() != q.shape[0] + 1:
        raise ValueError(f"offsets must have B+1={q.shape[0] + 1} entries, got {offsets.numel()}")
    if backend == "reference" or (backend == "auto" and not (q.is_cuda and _triton_available())):
        return compressed_attention_reference(q, k, v, offsets, q_limit, scale)
    if backend not in ("auto", "triton"):
        raise ValueError(f"unknown backend {backend!r}; allowed: auto, triton, reference")
    from kernels._triton_compressed_attention import CompressedAttentionFn

    return CompressedAttentionFn.apply(q, k, v, offsets, q_limit, scale)


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
    """Triton installed and this op's Triton module present (checked once)."""
    return importlib.util.find_spec("triton") is not None and importlib.util.find_spec(
        "kernels._triton_compressed_attention") is not None
