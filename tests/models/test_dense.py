"""Dense-feature embedding (recdistill/models/dense.py) and the student's per-feature dense tokens: the encoding's
shape and saturation, bins fitted to data (constant columns included), what the tokens can represent that one
linear token cannot, and the fitted bins travelling inside the exported program."""

import math

import pytest
import torch
from helpers import SCHEMA, make_batch

from recdistill.models.dense import DenseEmbedding, normal_edges, quantile_edges
from recdistill.models.student import ServedStudent, StudentModel, serving_inputs
from recdistill.serve import ServingSpec, export_served, load_served

KINDS = {"ctr": "binary", "watch_time": "continuous"}


def test_encoding_is_a_saturating_piecewise_linear_coordinate():
    emb = DenseEmbedding(1, 4, bins=4)
    emb.edges.copy_(torch.tensor([[0.0, 1.0, 2.0, 4.0, 8.0]]))
    x = torch.tensor([[-5.0], [0.0], [0.5], [1.0], [3.0], [8.0], [100.0]])
    enc = emb.encode(x)
    assert enc.shape == (7, 1, 4)
    torch.testing.assert_close(enc[:, 0], torch.tensor([
        [0, 0, 0, 0], [0, 0, 0, 0], [0.5, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0.5, 0], [1, 1, 1, 1], [1, 1, 1, 1.0]]))
    # monotone in the value, flat outside the fitted range
    grid = torch.linspace(-10, 20, 301).unsqueeze(1)
    total = emb.encode(grid).sum(-1).squeeze(1)
    assert (total.diff() >= 0).all() and total[0] == 0 and total[-1] == 4
    assert emb(x).shape == (7, 1, 4)


def test_fit_sets_per_feature_quantiles_and_survives_constant_and_binary_columns():
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.randn(5000, generator=g) * 100 + 7,           # another scale and offset
                     torch.rand(5000, generator=g).log().neg(),          # skewed (exponential)
                     torch.full((5000,), 3.0),                           # constant
                     (torch.rand(5000, generator=g) < 0.2).float()], 1)  # binary
    x[0, 0] = float("nan")  # non-finite values are skipped
    emb = DenseEmbedding(4, 3, bins=8)
    before = emb.edges.clone()
    torch.testing.assert_close(before, normal_edges(4, 8))
    emb.fit(x)
    q = torch.linspace(0.005, 0.995, 9, dtype=torch.float64)
    torch.testing.assert_close(emb.edges[1], torch.quantile(x[:, 1].double(), q).float())
    assert emb.edges[0, 0] < -150 and emb.edges[0, -1] > 150  # the feature's own scale, not the normal's
    out = emb(x[1:])
    assert torch.isfinite(out).all()
    enc = emb.encode(x[1:])
    assert torch.equal(enc[:, 2], enc[:1, 2].expand_as(enc[:, 2]))  # a constant column encodes to one value
    ones, zeros = enc[x[1:, 3] == 1, 3], enc[x[1:, 3] == 0, 3]
    assert (ones.sum(-1) > zeros.sum(-1).max()).all()  # binary: the two values encode apart
    with pytest.raises(ValueError, match=r"expected \[N, 4\]"):
        emb.fit(x[:, :2])
    torch.testing.assert_close(quantile_edges(torch.full((3, 1), float("nan")), 8), normal_edges(1, 8))


def _fit_r2(make, target, x, steps=300):
    """R^2 of `make()` fitted to `target` on `x` by full-batch Adam (one thread: tiny ops, ~10x faster)."""
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            loss = (model(x) - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        return 1 - float((model(x) - target).var() / target.var())


def test_tokens_represent_a_univariate_bump_and_a_product_that_one_linear_token_cannot():
    """The synthetic world's dense part has sin(2 x0) x1: as an FM dot of two per-feature tokens it is a sum of
    products f(x0) g(x1), which bins represent; a linear token's dot products are bilinear in x and cannot."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 2, generator=g)
    target = torch.sin(2 * x[:, 0]) * x[:, 1]

    class Bins(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = DenseEmbedding(2, 8, bins=16)
            self.emb.fit(x)

        def forward(self, v: torch.Tensor) -> torch.Tensor:
            t = self.emb(v)
            return (t[:, 0] * t[:, 1]).sum(-1)

    class Linear(torch.nn.Module):  # two linear tokens of all the dense values, the old student's kind
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 8), torch.nn.Linear(2, 8)

        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return (self.a(v) * self.b(v)).sum(-1)

    assert _fit_r2(Bins, target, x) > 0.9
    assert _fit_r2(Linear, target, x) < 0.3  # what a bilinear x0 x1 term explains of it
    bump = torch.exp(-4 * x[:, 0] ** 2)  # a univariate non-monotone effect
    assert _fit_r2(lambda: _Sum(x), bump, x) > 0.95


class _Sum(torch.nn.Module):
    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.emb = DenseEmbedding(2, 4, bins=16)
        self.emb.fit(x)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.emb(v)[:, 0].sum(-1)


def test_student_has_one_token_per_dense_feature_and_linear_keeps_the_old_one():
    bins = StudentModel(SCHEMA, emb_dim=4, hidden=8, history_len=5, dense="bins")
    lin = StudentModel(SCHEMA, emb_dim=4, hidden=8, history_len=5)  # the default
    assert bins.dense_proj is None and bins.dense_emb.edges.shape == (len(SCHEMA.dense), 17)
    assert lin.dense_emb is None and lin.dense_proj.in_features == len(SCHEMA.dense)
    # one more field per extra dense feature: its embedding and its FM dots with every other field
    n = lin.backbone[0].in_features
    n_vec = (-(4 + 1) + math.isqrt((4 + 1) ** 2 + 8 * n)) // 2  # d_in = 4 n + n (n - 1) / 2
    assert bins.backbone[0].in_features == 4 * (n_vec + 1) + (n_vec + 1) * n_vec // 2
    both = StudentModel(SCHEMA, emb_dim=4, hidden=8, history_len=5, dense="linear+bins")
    assert both.dense_proj.in_features == len(SCHEMA.dense) and both.dense_emb.edges.shape == (len(SCHEMA.dense), 17)
    assert both.backbone[0].in_features == 4 * (n_vec + 2) + (n_vec + 2) * (n_vec + 1) // 2  # the linear token too
    b = make_batch()
    for m in (bins, lin, both):
        assert torch.isfinite(m(b).main["ctr"]).all()
    with pytest.raises(ValueError, match="'linear', 'bins', 'linear\\+bins', got 'mlp'"):
        StudentModel(SCHEMA, dense="mlp")


@pytest.mark.parametrize("mode", ["bins", "linear+bins"])
def test_fitted_bins_are_inside_the_exported_program(tmp_path, mode):
    """The bins fitted to training rows are part of the served program: the loaded program follows the model on
    raw dense values of another scale (no normalisation outside it), and the fitted edges change the predictions."""
    torch.manual_seed(0)
    model = StudentModel(SCHEMA, emb_dim=4, hidden=8, history_len=5, dense=mode).eval()
    batch = make_batch(n=13, seed=5)
    batch.dense = batch.dense * 50 + 200  # far outside the normal default edges
    served = ServedStudent(model, torch.zeros(SCHEMA.num_traffic), KINDS)
    unfitted = served(*serving_inputs(model, batch))
    model.fit_dense(torch.randn(1000, len(SCHEMA.dense)) * 50 + 200)
    fitted = served(*serving_inputs(model, batch))
    assert not torch.allclose(fitted, unfitted)
    path = export_served(served, ServingSpec.of(model, SCHEMA), tmp_path / "student.pt2")
    torch.testing.assert_close(load_served(path)(batch), fitted)
    edges = torch.export.load(path).state_dict["model.dense_emb.edges"]
    torch.testing.assert_close(edges, model.dense_emb.edges)
