"""Fused token mixing + per-token SwiGLU FFN + revert (TokenMixer-Large block core).

    y = revert(PFFN(mix(x)))      x [B, T, D], w_in [T, D, 2F] (= [gate | up]), w_out [T, F, D]

mix: token t's D channels are T heads of D/T; mixed token t is the concatenation over source tokens s of head t
of token s (a transpose of the token and head axes). With as many heads as tokens this is an involution, so
revert is the same permutation. PFFN: per-token SwiGLU, token t with its own weights.

Dispatch: backend="auto" runs the Triton kernels on CUDA tensors when Triton is installed, the PyTorch reference
elsewhere; "triton" forces Triton (on CPU only under TRITON_INTERPRET=1), "reference" forces the reference.
The Triton path folds mix and revert into its loads and stores (no transposed copy), runs the T per-token GEMMs as
one grouped launch, accumulates in fp32, and takes bf16, fp16 or fp32 (weights are cast to x's dtype).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "triton", "reference")


def mix_tokens(x: torch.Tensor) -> torch.Tensor:
    """Multi-head token mixing [B, T, D] -> [B, T, D] (its own inverse)."""
    b, t, d = x.shape
    if d % t:
        raise ValueError(f"token mixing needs D divisible by T, got D={d}, T={t}")
    return x.reshape(b, t, t, d // t).transpose(1, 2).reshape(b, t, d)


def token_mixer_reference(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """PyTorch reference: computes in fp32 (at least), returns x's dtype."""
    dtype = x.dtype
    acc = torch.promote_types(dtype, torch.float32)
    m = mix_tokens(x.to(acc))
    gate, up = torch.einsum("btd,tdf->btf", m, w_in.to(acc)).chunk(2, dim=-1)
    out = torch.einsum("btf,tfd->btd", F.silu(gate) * up, w_out.to(acc))
    return mix_tokens(out).to(dtype)


def _check(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> None:
    if x.dim() != 3 or w_in.dim() != 3 or w_out.dim() != 3:
        raise ValueError(f"x must be [B, T, D], w_in [T, D, 2F], w_out [T, F, D]; got {tuple(x.shape)}, "
                         f"{tuple(w_in.shape)}, {tuple(w_out.shape)}")
    b, t, d = x.shape
    if t == 0 or d % t:
        raise ValueError(f"token mixing needs D divisible by T, got D={d}, T={t}")
    if w_in.shape[:2] != (t, d) or w_in.shape[2] % 2:
        raise ValueError(f"w_in must be [T={t}, D={d}, 2F], got {tuple(w_in.shape)}")
    f = w_in.shape[2] // 2
    if tuple(w_out.shape) != (t, f, d):
        raise ValueError(f"w_out must be [T={t}, F={f}, D={d}], got {tuple(w_out.shape)}")


def token_mixer(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """revert(PFFN(mix(x))) with autograd; x [B, T, D], w_in [T, D, 2F] (= [gate | up]), w_out [T, F, D] -> [B, T, D]
    in x's dtype. backend: 'auto' | 'triton' | 'reference'."""
    _check(x, w_in, w_out)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "reference" or (backend == "auto" and not (x.is_cuda and _triton_available())):
        return token_mixer_reference(x, w_in, w_out)
    from kernels._triton_token_mixer import token_mixer as triton_token_mixer

    return triton_token_mixer(x, w_in, w_out)


@functools.cache
def _triton_available() -> bool:
    """Triton installed (checked once)."""
    return importlib.util.find_spec("triton") is not None
