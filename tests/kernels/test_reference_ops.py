"""The PyTorch references of the kernels against naive per-row / per-token loops (float64), and their dispatch."""

import math

import pytest
import torch

from kernels.compressed_attention import compressed_attention, compressed_attention_reference, merge_mean
from kernels.token_mixer import mix_tokens, token_mixer, token_mixer_reference


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def naive_attention(q, k, v, offsets, q_limit, scale):
    b, nq, h, d = q.shape
    out = torch.zeros_like(q)
    for i in range(b):
        s, e = int(offsets[i]), int(offsets[i + 1])
        for j in range(nq):
            n = min(e - s, int(q_limit[i, j]))
            if n <= 0:
                continue
            for hh in range(h):
                w = torch.softmax((k[s : s + n, hh] @ q[i, j, hh]) * scale, dim=0)
                out[i, j, hh] = w @ v[s : s + n, hh]
    return out


@pytest.mark.parametrize("seed", range(4))
def test_compressed_attention_reference_matches_naive(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([0, 1, 7, 3, 12])[torch.randperm(5, generator=g)]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    n, b, nq, h, d = int(lengths.sum()), 5, 3, 2, 5
    q = torch.randn(b, nq, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(n, h, d, generator=g, dtype=torch.float64)
    v = torch.randn(n, h, d, generator=g, dtype=torch.float64)
    q_limit = torch.randint(0, 14, (b, nq), generator=g)
    q_limit[0, 0] = torch.iinfo(torch.int64).max  # "all"
    out = compressed_attention(q, k, v, offsets, q_limit, scale=0.3, backend="reference")
    want = naive_attention(q, k, v, offsets, q_limit, 0.3)
    assert rel_err(out, want) < 1e-12
    assert torch.isfinite(out).all()
    # default scale and no limit
    full = compressed_attention_reference(q, k, v, offsets)
    assert rel_err(full, naive_attention(q, k, v, offsets, torch.full((b, nq), 99), 1 / math.sqrt(d))) < 1e-12


def test_compressed_attention_reference_merge_and_negative_limit_match_naive():
    """merge_k > 1 equals merge_mean then attention; a negative q_limit means "the whole history"."""
    g = torch.Generator().manual_seed(5)
    events = torch.tensor([9, 0, 4, 1])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), events.cumsum(0)])
    b, nq, h, d, k_merge = 4, 3, 2, 4, 4
    q = torch.randn(b, nq, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(int(events.sum()), h, d, generator=g, dtype=torch.float64)
    v = torch.randn(int(events.sum()), h, d, generator=g, dtype=torch.float64)
    q_limit = torch.tensor([[-1, 1, 2], [-5, 0, 3], [-1, 0, 1], [7, -1, 0]])
    out = compressed_attention_reference(q, k, v, offsets, q_limit, 0.5, merge_k=k_merge)
    km, m_off = merge_mean(k, offsets, k_merge)
    vm, _ = merge_mean(v, offsets, k_merge)
    all_ = torch.where(q_limit < 0, torch.full_like(q_limit, 99), q_limit)
    assert rel_err(out, naive_attention(q, km, vm, m_off, all_, 0.5)) < 1e-12
    assert (out[1] == 0).all() and (out[0, 0] != 0).all()  # row 1 is empty


def test_compressed_attention_masked_rows_zero_output_and_grad():
    q = torch.randn(2, 2, 1, 4, requires_grad=True)
    k = torch.randn(3, 1, 4, requires_grad=True)
    offsets = torch.tensor([0, 0, 3])
    out = compressed_attention(q, k, k, offsets, torch.tensor([[5, 5], [0, 2]]))
    assert (out[0] == 0).all() and (out[1, 0] == 0).all() and (out[1, 1] != 0).any()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[0] == 0).all() and (q.grad[1, 0] == 0).all()
    assert (k.grad[2] == 0).all()  # position 2 is beyond every limit of row 1


def test_merge_mean_matches_loop():
    x = torch.randn(11, 2, 3, dtype=torch.float64)
    offsets = torch.tensor([0, 5, 5, 6, 11])
    merged, m_off = merge_mean(x, offsets, 2)
    assert m_off.tolist() == [0, 3, 3, 4, 7]
    rows = []
    for i in range(4):
        s, e = int(offsets[i]), int(offsets[i + 1])
        rows += [x[p : min(p + 2, e)].mean(0) for p in range(s, e, 2)]
    torch.testing.assert_close(merged, torch.stack(rows))


def test_token_mixer_reference_matches_per_token_loop():
    g = torch.Generator().manual_seed(0)
    b, t, d, f = 3, 4, 8, 5
    x = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    w_in = torch.randn(t, d, 2 * f, generator=g, dtype=torch.float64)
    w_out = torch.randn(t, f, d, generator=g, dtype=torch.float64)
    dh = d // t

    def naive_mix(z):  # token tt <- concat over source tokens s of head tt of token s
        return torch.stack([torch.cat([z[:, s, tt * dh : (tt + 1) * dh] for s in range(t)], -1) for tt in range(t)], 1)

    mixed = naive_mix(x)
    assert torch.equal(mix_tokens(x), mixed)
    assert torch.equal(mix_tokens(mixed), x)  # revert == mix (involution)
    ffn = torch.stack([torch.nn.functional.silu(mixed[:, tt] @ w_in[tt, :, :f]) * (mixed[:, tt] @ w_in[tt, :, f:])
                       @ w_out[tt] for tt in range(t)], 1)
    want = naive_mix(ffn)
    assert rel_err(token_mixer_reference(x, w_in, w_out), want) < 1e-12
    # fp16 input: computed in fp32, returned in fp16
    y16 = token_mixer_reference(x.half(), w_in.half(), w_out.half())
    assert y16.dtype == torch.float16 and rel_err(y16.double(), want) < 1e-2


def test_dispatch_and_shape_errors():
    x = torch.randn(2, 4, 8)
    assert torch.equal(token_mixer(x, torch.ones(4, 8, 6), torch.ones(4, 3, 8)),
                       token_mixer_reference(x, torch.ones(4, 8, 6), torch.ones(4, 3, 8)))  # auto on CPU
    with pytest.raises(ValueError, match="D divisible by T"):
        mix_tokens(torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match=r"w_out must be \[T=4, F=3, D=8\]"):
        token_mixer(x, torch.ones(4, 8, 6), torch.ones(4, 2, 8))
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        token_mixer(x, torch.ones(4, 8, 6), torch.ones(4, 3, 8), backend="cuda")
    with pytest.raises(ValueError, match="offsets must have B\\+1=2 entries"):
        compressed_attention(torch.randn(1, 1, 1, 2), torch.randn(3, 1, 2), torch.randn(3, 1, 2), torch.tensor([0]))
