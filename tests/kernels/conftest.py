"""Kernel tests: run Triton through its CPU interpreter where there is no GPU, and poison kernel outputs.

TRITON_INTERPRET itself is set by tests/conftest.py, before anything imports triton (see there why it must be that
early); the line below only covers running this directory with another rootdir. On a CUDA machine it is left alone
and the kernels run for real.
"""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """NaN-fill every buffer a Triton wrapper allocates, so an element a kernel forgets to write shows up."""
    from kernels import _common

    monkeypatch.setattr(_common, "POISON", True)


@pytest.fixture(scope="session", autouse=True)
def _interpreter_rounds_to_nearest():
    """Make the interpreter's fp32 -> bf16 cast round to nearest even, as the GPU's cvt.rn.bf16.f32 does.

    Triton 3.x's interpreter truncates that cast (round toward zero), a one-sided error of up to one bf16 ulp that
    roughly doubles the measured bf16 error and would force looser tolerances than the hardware needs. Only the
    interpreter's rounding is changed (a test-only emulation fix); the kernels are untouched. Skipped on a GPU or
    if the interpreter's internals moved (then bf16 tests may need their tolerances revisited).
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        yield
        return
    orig = getattr(interpreter, "_convert_float", None)
    if orig is None:
        yield
        return

    def convert(x, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            bits = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).view(torch.int16)
            return bits.numpy().view(np.uint16)
        return orig(x, src, dst, rounding_mode)

    interpreter._convert_float = convert
    yield
    interpreter._convert_float = orig
