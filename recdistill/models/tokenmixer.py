"""TokenMixer-Large: feature tokens mixed across tokens and transformed by per-token SwiGLU FFNs.

    tokens = tokenizer(features)                      [B, T, D]
    block:  x = x + revert(PFFN(mix(RMSNorm(x))))     (fused op: kernels.token_mixer)
            optional sparse per-token MoE: top-k routed experts + an always-on shared expert
    every `interlayer` blocks the group's input is added again (inter-layer residual; helps deep stacks train)

The per-token FFN weights ([T, D, 2F] and [T, F, D]) are where the dense parameters live, so model size scales
with T * D * F * layers. The down projection starts small so each block begins near the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels.token_mixer import mix_tokens, token_mixer


def _per_token_weights(t: int, d: int, f: int, down_scale: float) -> tuple[nn.Parameter, nn.Parameter]:
    w_in = nn.Parameter(torch.randn(t, d, 2 * f) / math.sqrt(d))
    w_out = nn.Parameter(torch.randn(t, f, d) * (down_scale / math.sqrt(f)))
    return w_in, w_out


class Tokenizer(nn.Module):
    """Concatenated feature vector [B, n_in] -> T tokens of width D: split into T chunks, one linear per chunk."""

    def __init__(self, n_in: int, t: int, d: int) -> None:
        super().__init__()
        self.t, self.chunk = t, math.ceil(n_in / t)
        self.pad = self.chunk * t - n_in
        self.padded_in = self.chunk * t  # inputs after padding: the tokenizer's FLOPs are 2 * padded_in * D
        self.weight = nn.Parameter(torch.randn(t, self.chunk, d) / math.sqrt(self.chunk))
        self.bias = nn.Parameter(torch.zeros(t, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, self.pad)).view(x.shape[0], self.t, self.chunk)
        return torch.einsum("btc,tcd->btd", x, self.weight) + self.bias


class GroupedTokenizer(nn.Module):
    """Feature groups -> their own tokens: the input [B, sum n_g] is cut into consecutive groups of n_g inputs, and
    group g is chunked into t_g tokens of width D (a Tokenizer each); tokens are concatenated in group order.

    Why: chunking one long concatenation gives each group tokens in proportion to its width. In the teacher the
    LONGER outputs are ~80% of the input, so every categorical and dense feature lands in one or two of the T
    tokens; after token mixing each per-token FFN sees only a D/T-wide slice of them, and crosses of those
    features are not learned at all (benchmarks/interaction_learnability.py, docs/LOG.md)."""

    def __init__(self, groups: list[tuple[int, int]], d: int) -> None:
        super().__init__()
        self.sizes = [n for n, _ in groups]
        self.parts = nn.ModuleList([Tokenizer(n, t, d) for n, t in groups])
        self.t = sum(t for _, t in groups)
        self.padded_in = sum(p.padded_in for p in self.parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([tok(g) for tok, g in zip(self.parts, torch.split(x, self.sizes, dim=1), strict=True)],
                         dim=1)


class TokenMoE(nn.Module):
    """Sparse per-token MoE: each token picks its top-k of E experts (per-token SwiGLU each), plus a shared expert.

    Reference formulation: every expert runs on every token and non-selected ones are zero-weighted. Exact, and
    fine at test and CPU sizes; a grouped routed kernel is what large GPU runs would want.
    """

    def __init__(self, t: int, d: int, f: int, experts: int, topk: int, down_scale: float) -> None:
        super().__init__()
        if not 1 <= topk <= experts:
            raise ValueError(f"moe topk={topk} must be in [1, experts={experts}]")
        self.topk = topk
        self.router = nn.Parameter(torch.randn(t, d, experts) * 0.02)
        self.shared_in, self.shared_out = _per_token_weights(t, d, f, down_scale)
        pairs = [_per_token_weights(t, d, f, down_scale) for _ in range(experts)]
        self.w_in = nn.ParameterList([p[0] for p in pairs])
        self.w_out = nn.ParameterList([p[1] for p in pairs])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = token_mixer(x, self.shared_in, self.shared_out)
        m = mix_tokens(x)  # route on the mixed token, the FFN's input
        logits = torch.einsum("btd,tde->bte", m, self.router)
        top, idx = logits.topk(self.topk, dim=-1)
        gates = torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, dim=-1))
        # token_mixer applies revert at the end; gates are per *mixed* token, so revert them the same way
        for e, (w_in, w_out) in enumerate(zip(self.w_in, self.w_out, strict=True)):
            g = gates[..., e : e + 1].expand(-1, -1, x.shape[-1])
            out = out + mix_tokens(g) * token_mixer(x, w_in, w_out)
        return out


def run_block(block: nn.Module, *args: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """`block(*args)`, under activation checkpointing when asked and gradients are on: only the block's inputs
    are kept and its forward runs again in backward. Non-reentrant (torch's recommended form): it supports
    autograd.Function kernels and inputs that need no gradient, and recomputes the same values."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class TokenMixerBlock(nn.Module):
    """Pre-RMSNorm -> token mixing + per-token SwiGLU (+ MoE) -> revert -> residual."""

    def __init__(self, t: int, d: int, f: int, experts: int = 0, topk: int = 1, down_scale: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.moe = TokenMoE(t, d, f, experts, topk, down_scale) if experts else None
        if not experts:
            self.w_in, self.w_out = _per_token_weights(t, d, f, down_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + (self.moe(h) if self.moe is not None else token_mixer(h, self.w_in, self.w_out))


class TokenMixerLarge(nn.Module):
    """Tokenizer + a stack of TokenMixer blocks with inter-layer residuals; returns the final tokens [B, T, D]."""

    def __init__(self, n_in: int, *, tokens: int, dim: int, ffn_mult: float, layers: int, experts: int = 0,
                 topk: int = 1, interlayer: int = 2, groups: list[tuple[int, int]] | None = None,
                 checkpointing: bool = False) -> None:
        """groups: optional (inputs, tokens) per consecutive feature group (GroupedTokenizer); their inputs must
        sum to n_in and their tokens to `tokens`. None: one group, chunked evenly (Tokenizer).
        checkpointing: recompute each block in backward (activation checkpointing) instead of keeping its
        activations; the gradients are the same."""
        super().__init__()
        if dim % tokens:
            raise ValueError(f"token mixing needs d_model % num_tokens == 0, got {dim} % {tokens}")
        f = max(1, int(dim * ffn_mult))
        if groups is None:
            self.tokenizer = Tokenizer(n_in, tokens, dim)
        else:
            if sum(n for n, _ in groups) != n_in or sum(t for _, t in groups) != tokens or min(
                    min(n, t) for n, t in groups) < 1:
                raise ValueError(f"token groups {groups} must each have >= 1 input and token, and sum to "
                                 f"{n_in} inputs and {tokens} tokens")
            self.tokenizer = GroupedTokenizer(groups, dim)
        self.blocks = nn.ModuleList([TokenMixerBlock(tokens, dim, f, experts, topk) for _ in range(layers)])
        self.interlayer = interlayer
        self.norm = nn.RMSNorm(dim)
        self.checkpointing = checkpointing

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.tokenizer(features)
        group_in = x
        for i, block in enumerate(self.blocks):
            x = run_block(block, x, checkpointing=self.checkpointing)
            if self.interlayer and (i + 1) % self.interlayer == 0:
                x, group_in = x + group_in, x + group_in
        return self.norm(x)
