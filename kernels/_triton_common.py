"""Triton helpers shared by the kernels (imported only with them)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def dot_precision(dtype: torch.dtype) -> str:
    """The PREC constexpr of `_dot`: "ieee" (exact fp32 products; TF32 would cost ~1e-3 relative error) for fp32
    inputs; "upcast" for bf16 under TRITON_INTERPRET (the interpreter keeps bf16 as raw uint16 and its tl.dot
    multiplies the bit patterns; bf16 x bf16 products are exact in fp32, so upcasting gives the tensor-core result);
    "tf32" otherwise (no effect on bf16/fp16 inputs)."""
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and triton.knobs.runtime.interpret:
        return "upcast"
    return "tf32"


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b with fp32 accumulation (see dot_precision for PREC)."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)
