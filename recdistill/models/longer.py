"""LONGER-style long-sequence encoder (RecSys 2025, arXiv 2505.04421), built from the paper.

    events [N, E] (jagged, oldest first)  --token merge of K adjacent events-->  merged [M, d]
    queries = global tokens (target item, user, context, CLS) + the `recent` most recent merged tokens
    layer 1: causal cross-attention queries -> whole merged history (kernels.compressed_attention, jagged)
    layers 2..: self-attention within the query set
    -> [B, G + recent, d]

Keys and values come from the history only — never from the candidate — so at serving time they can be computed
once per user and cached; only the (few) queries depend on the candidate. Merging K events into one token cuts
attention cost by K while the merge layer keeps within-group detail.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kernels.compressed_attention import compressed_attention
from recdistill.models.tokenmixer import run_block

ALL = torch.iinfo(torch.int64).max  # q_limit value meaning "sees the whole history"


def merge_groups(offsets: torch.Tensor, k: int, n_events: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For jagged rows split into groups of K adjacent events: per-event group id, position within the group, and
    the merged offsets [B+1] (the last group of a row may be partial)."""
    lengths = offsets[1:] - offsets[:-1]
    m_off = torch.zeros_like(offsets)
    torch.cumsum((lengths + k - 1) // k, 0, out=m_off[1:])
    row = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=n_events)
    local = torch.arange(n_events, device=offsets.device) - offsets[row]
    return m_off[row] + local // k, local % k, m_off


class TokenMerge(nn.Module):
    """K adjacent events -> one token of width d. 'linear': concat the K events (zeros for a partial group) and
    project; 'transformer': a small self-attention layer inside each group, then concat + project."""

    def __init__(self, event_dim: int, d: int, k: int, kind: Literal["linear", "transformer"] = "linear") -> None:
        super().__init__()
        self.k, self.kind = k, kind
        self.inner = nn.TransformerEncoderLayer(event_dim, nhead=1, dim_feedforward=2 * event_dim, batch_first=True,
                                                norm_first=True, dropout=0.0) if kind == "transformer" else None
        self.proj = nn.Linear(k * event_dim, d)

    def forward(self, events: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        group, pos, m_off = merge_groups(offsets, self.k, events.shape[0])
        total = int(m_off[-1])
        grid = events.new_zeros(total, self.k, events.shape[1])
        grid[group, pos] = events
        if self.inner is not None and total:
            present = torch.zeros(total, self.k, dtype=torch.bool, device=events.device)
            present[group, pos] = True
            grid = self.inner(grid, src_key_padding_mask=~present) * present.unsqueeze(-1)
        return self.proj(grid.reshape(total, -1)), m_off


def recent_tokens(merged: torch.Tensor, m_off: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The r most recent merged tokens per row, left-aligned padded [B, r, d], their validity mask [B, r] and
    their merged positions [B, r] (for the causal limit)."""
    lengths = m_off[1:] - m_off[:-1]
    b = lengths.numel()
    take = lengths.clamp(max=r)
    col = torch.arange(r, device=merged.device).expand(b, r)
    mask = col < take.unsqueeze(1)
    pos = lengths.unsqueeze(1) - take.unsqueeze(1) + col  # position within the row
    idx = (m_off[:-1].unsqueeze(1) + pos).clamp(max=max(merged.shape[0] - 1, 0))
    out = merged[idx] * mask.unsqueeze(-1) if merged.shape[0] else merged.new_zeros(b, r, merged.shape[1])
    return out, mask, pos


class FFN(nn.Module):
    """Pre-norm SwiGLU feed-forward with a residual."""

    def __init__(self, d: int, mult: int = 2) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.up = nn.Linear(d, 2 * mult * d)
        self.down = nn.Linear(mult * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.up(self.norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u)


class CrossAttention(nn.Module):
    """Queries [B, Nq, d] over the jagged merged history [M, d], causal per query."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"longer_dim={d} must be divisible by longer_heads={heads}")
        self.h, self.dh = heads, d // heads
        self.norm_q, self.norm_kv = nn.RMSNorm(d), nn.RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, queries: torch.Tensor, merged: torch.Tensor, m_off: torch.Tensor,
                q_limit: torch.Tensor) -> torch.Tensor:
        b, nq, d = queries.shape
        kv = self.norm_kv(merged)
        q = self.q(self.norm_q(queries)).view(b, nq, self.h, self.dh)
        k = self.k(kv).view(-1, self.h, self.dh)
        v = self.v(kv).view(-1, self.h, self.dh)
        out = compressed_attention(q, k, v, m_off, q_limit=q_limit, scale=1.0 / math.sqrt(self.dh))
        return queries + self.o(out.reshape(b, nq, d))


class SelfAttention(nn.Module):
    """Self-attention within the query set (padded recent slots are masked as keys)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.attn(h, h, h, key_padding_mask=~key_valid, need_weights=False)[0]


class LongerEncoder(nn.Module):
    """Global tokens + jagged event embeddings -> query-token outputs [B, G + recent, d] (see module docstring)."""

    def __init__(self, event_dim: int, d: int, *, heads: int, layers: int, merge_k: int, recent: int,
                 merge_kind: Literal["linear", "transformer"] = "linear", checkpointing: bool = False) -> None:
        """checkpointing: recompute each layer (cross-attention + FFN, then self-attention + FFN) in backward
        instead of keeping its activations; the gradients are the same."""
        super().__init__()
        self.recent = recent
        self.checkpointing = checkpointing
        self.merge = TokenMerge(event_dim, d, merge_k, merge_kind)
        self.cross = CrossAttention(d, heads)
        self.ffn = nn.ModuleList([FFN(d) for _ in range(layers)])
        self.self_attn = nn.ModuleList([SelfAttention(d, heads) for _ in range(layers - 1)])

    def forward(self, global_tokens: torch.Tensor, events: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        b, g, _ = global_tokens.shape
        merged, m_off = self.merge(events, offsets)
        rec, rec_valid, rec_pos = recent_tokens(merged, m_off, self.recent)
        queries = torch.cat([global_tokens, rec], dim=1)
        # Global queries see the whole history; a recent token sees itself and what came before it (causal);
        # padding slots see nothing (their output is zero from the attention and masked as keys later).
        limit = torch.where(rec_valid, rec_pos + 1, torch.zeros_like(rec_pos))
        q_limit = torch.cat([torch.full((b, g), ALL, dtype=torch.int64, device=events.device), limit], dim=1)
        x = run_block(self._cross_layer, queries, merged, m_off, q_limit, checkpointing=self.checkpointing)
        valid = torch.cat([torch.ones(b, g, dtype=torch.bool, device=events.device), rec_valid], dim=1)
        for i in range(len(self.self_attn)):
            x = run_block(partial(self._self_layer, i), x, valid, checkpointing=self.checkpointing)
        return x * valid.unsqueeze(-1)

    def _cross_layer(self, queries: torch.Tensor, merged: torch.Tensor, m_off: torch.Tensor,
                     q_limit: torch.Tensor) -> torch.Tensor:
        """Layer 1: cross-attention of the queries over the merged history, then its FFN."""
        return self.ffn[0](self.cross(queries, merged, m_off, q_limit))

    def _self_layer(self, i: int, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Layer i + 2: self-attention within the query set, then its FFN."""
        return self.ffn[i + 1](self.self_attn[i](x, valid))
