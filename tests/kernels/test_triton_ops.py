"""Triton kernels (forward and every gradient) against the float64 PyTorch reference, and the dispatch.

On a machine without CUDA the kernels run in Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1), so the
shapes are tiny; hypothesis draws them fresh each run (KERNELS_HYPOTHESIS_EXAMPLES=200 for a longer search).
Error measure: ||out - ref|| / ||ref|| with the reference in float64 on the *same* (already rounded) inputs and the
same upstream gradient, so only the kernel's own arithmetic is measured. Tolerances:
  fp32 1e-4: exact-fp32 products (input_precision="ieee"), fp32 accumulation; seen ~1e-6 here.
  fp16 3e-3: operands and stored intermediates (p, dS, h, dG/dU, outputs) round to 11 bits; seen <= 1e-3.
  bf16 1e-2: the same with 8 bits (16x the fp16 rounding); seen <= 4e-3.
Queries that see nothing are checked for exact zeros separately (test_..._masked_queries_are_exact_zeros).
"""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels.compressed_attention import compressed_attention, compressed_attention_reference
from kernels.token_mixer import token_mixer, token_mixer_reference

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: interpreter (conftest.py)
EXAMPLES = int(os.environ.get("KERNELS_HYPOTHESIS_EXAMPLES", "25"))
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1e-2}
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / max(||ref||, 0.25 sqrt(n)): relative, except that a tensor whose RMS is below 0.25 (inputs and
    upstream gradients are unit normal, so 0.25 is the scale of the problem) is measured against RMS 0.25. Needed
    where the result is small through cancellation while the rounding is not: dq of a query that sees one key is
    p (dp - delta) = 0 up to summation order (fp32: ~1e-7 against a float64 ~1e-17); an attention output is a
    convex combination of unit-size v rows whose bf16-rounded weights err by ~2^-9 |v| even when the output is
    ~0.07 (hypothesis found 1.2% relative there with a 0.05 floor)."""
    floor = 0.25 * max(ref.numel(), 1) ** 0.5
    return float((out.double() - ref).norm() / max(float(ref.norm()), floor))


def assert_rel_close(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten poisoned output or NaN)"
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{name} [{dtype}]: relative error {err:.3g} >= {TOL[dtype]}"


def run_both(fn_ref, fn_tri, inputs: list[torch.Tensor], dtype: torch.dtype, upstream_seed: int):
    """(out, grads) of the Triton op in `dtype` and of the reference in float64, same inputs and upstream grad."""
    inputs = [x.to(dtype) for x in inputs]  # round once; the reference sees the same rounded values
    results = []
    for fn, dt in ((fn_tri, dtype), (fn_ref, torch.float64)):
        leaves = [x.detach().to(dt).requires_grad_() for x in inputs]
        out = fn(*leaves)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(upstream_seed)).to(dtype).to(out)
        out.backward(g)
        # an input the graph never reached (k/v with zero rows in the reference) has a None grad: that is zero
        results.append((out.detach(), [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]))
    return results


# ---------------------------------------------------------------------------------------------- compressed attention


def assert_attention_matches_reference(seed, events, n_q, heads, d, merge_k, limit_mode, dtype, scale=None):
    g = torch.Generator().manual_seed(seed)
    b = len(events)
    offsets = torch.tensor([0, *torch.tensor(events, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64)
    n = int(offsets[-1])
    q, k, v = (torch.randn(s, generator=g) for s in ((b, n_q, heads, d), (n, heads, d), (n, heads, d)))
    merged_max = max((e + merge_k - 1) // merge_k for e in events)
    if limit_mode == "none":
        q_limit = None
    else:  # mixes "all" (-1 and beyond the end), "nothing" (0) and causal cut-offs
        q_limit = torch.randint(-1, merged_max + 3, (b, n_q), generator=g)
        if limit_mode == "masked":
            q_limit[0] = 0  # row 0 sees nothing at all
    off, lim = offsets.to(DEVICE), q_limit.to(DEVICE) if q_limit is not None else None
    res = run_both(
        lambda q_, k_, v_: compressed_attention_reference(q_, k_, v_, off, lim, scale, merge_k),
        lambda q_, k_, v_: compressed_attention(q_, k_, v_, off, lim, scale, merge_k, backend="triton"),
        [x.to(DEVICE) for x in (q, k, v)], dtype, seed + 1)
    (out, grads), (ref, ref_grads) = res
    assert_rel_close("out", out, ref, dtype)
    for name, gr, rg in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert_rel_close(name, gr, rg, dtype)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), events=st.lists(st.integers(0, 40), min_size=1, max_size=3),
       n_q=st.integers(1, 5), heads=st.integers(1, 2), d=st.sampled_from([1, 5, 16, 24]),
       merge_k=st.sampled_from([1, 1, 2, 3]), limit_mode=st.sampled_from(["none", "random", "masked"]),
       dtype=DTYPES, scale=st.sampled_from([None, 0.3]))
def test_compressed_attention_matches_reference(seed, events, n_q, heads, d, merge_k, limit_mode, dtype, scale):
    assert_attention_matches_reference(seed, events, n_q, heads, d, merge_k, limit_mode, dtype, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("events, merge_k", [
    ([1], 1),               # B=1, a single key
    ([0, 0], 1),            # no keys anywhere (N=0)
    ([0, 70, 1], 1),        # empty, longer than one key block (BLOCK_N=64), length-1 rows
    ([17, 0, 9], 8),        # fused merge with partial last groups and an empty row
    ([130], 2),             # merged length 65: two key blocks after the merge
])
def test_compressed_attention_edge_cases(events, merge_k, dtype):
    assert_attention_matches_reference(7, events, 3, 2, 8, merge_k, "random", dtype)


def test_compressed_attention_masked_queries_are_exact_zeros():
    """Queries that see nothing: output and dq exactly 0; keys no query sees: dk = dv = 0 (never NaN)."""
    q_limit = torch.tensor([[0, 0], [0, 2]], device=DEVICE)  # only query (1, 1) sees keys 0..1 of row 1
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 1, 4, generator=g).to(DEVICE).requires_grad_()
    k = torch.randn(11, 1, 4, generator=g).to(DEVICE).requires_grad_()
    v = torch.randn(11, 1, 4, generator=g).to(DEVICE).requires_grad_()
    offsets = torch.tensor([0, 5, 11], device=DEVICE)
    out = compressed_attention(q, k, v, offsets, q_limit, backend="triton")
    out.backward(torch.ones_like(out))
    assert (out[0] == 0).all() and (out[1, 0] == 0).all() and (out[1, 1] != 0).all()
    assert (q.grad[0] == 0).all() and (q.grad[1, 0] == 0).all() and torch.isfinite(q.grad).all()
    seen = torch.zeros(11, dtype=torch.bool)
    seen[5:7] = True
    assert (k.grad[~seen] == 0).all() and (v.grad[~seen] == 0).all() and (v.grad[seen] != 0).all()


# ---------------------------------------------------------------------------------------------------- token mixer


def assert_mixer_matches_reference(seed, b, t, dh, f, dtype):
    g = torch.Generator().manual_seed(seed)
    d = t * dh
    x = torch.randn(b, t, d, generator=g)
    w_in = torch.randn(t, d, 2 * f, generator=g) / d**0.5
    w_out = torch.randn(t, f, d, generator=g) / f**0.5
    (out, grads), (ref, ref_grads) = run_both(
        token_mixer_reference, lambda *a: token_mixer(*a, backend="triton"),
        [x.to(DEVICE), w_in.to(DEVICE), w_out.to(DEVICE)], dtype, seed + 1)
    assert_rel_close("y", out, ref, dtype)
    for name, gr, rg in zip(("dx", "dW_in", "dW_out"), grads, ref_grads, strict=True):
        assert_rel_close(name, gr, rg, dtype)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 7), t=st.integers(1, 4), dh=st.integers(1, 6),
       f=st.integers(1, 9), dtype=DTYPES)
def test_token_mixer_matches_reference(seed, b, t, dh, f, dtype):
    assert_mixer_matches_reference(seed, b, t, dh, f, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b, t, dh, f", [(1, 1, 1, 1), (3, 5, 7, 19), (70, 2, 9, 40)])  # the last spans 2 M tiles
def test_token_mixer_fixed_shapes(b, t, dh, f, dtype):
    assert_mixer_matches_reference(11, b, t, dh, f, dtype)


# ------------------------------------------------------------------------------------------------------- dispatch


def test_dispatch_auto_on_cpu_is_reference_and_triton_is_forced(monkeypatch):
    """auto on CPU never reaches the Triton Function; backend='triton' does (checked by making it raise)."""
    import kernels._triton_compressed_attention as tca
    import kernels._triton_token_mixer as ttm

    def boom(*_args, **_kwargs):
        raise RuntimeError("triton path taken")

    monkeypatch.setattr(ttm.TokenMixerFn, "apply", boom)
    monkeypatch.setattr(tca.CompressedAttentionFn, "apply", boom)
    x, w_in, w_out = torch.randn(2, 2, 4), torch.randn(2, 4, 6), torch.randn(2, 3, 4)
    q, k, off = torch.randn(1, 2, 1, 4), torch.randn(3, 1, 4), torch.tensor([0, 3])
    assert torch.equal(token_mixer(x, w_in, w_out), token_mixer_reference(x, w_in, w_out))
    assert torch.equal(compressed_attention(q, k, k, off), compressed_attention_reference(q, k, k, off))
    with pytest.raises(RuntimeError, match="triton path taken"):
        token_mixer(x, w_in, w_out, backend="triton")
    with pytest.raises(RuntimeError, match="triton path taken"):
        compressed_attention(q, k, k, off, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        compressed_attention(q, k, k, off, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: auto picks Triton only on CUDA tensors")
def test_dispatch_auto_on_cuda_is_triton(monkeypatch):
    import kernels._triton_token_mixer as ttm

    monkeypatch.setattr(ttm.TokenMixerFn, "apply", lambda *a: (_ for _ in ()).throw(RuntimeError("triton")))
    with pytest.raises(RuntimeError, match="triton"):
        token_mixer(torch.randn(2, 2, 4, device="cuda"), torch.randn(2, 4, 6, device="cuda"),
                    torch.randn(2, 3, 4, device="cuda"))


@pytest.mark.multiproc
def test_package_import_does_not_import_triton():
    """A CPU-only install imports the ops (and runs the references) without Triton being imported."""
    code = ("import sys, torch; import kernels.token_mixer as a, kernels.compressed_attention as b; "
            "a.token_mixer(torch.randn(1, 2, 4), torch.randn(2, 4, 2), torch.randn(2, 1, 4)); "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), env={**os.environ, "TRITON_INTERPRET": "0"})
