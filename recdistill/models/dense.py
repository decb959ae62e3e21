"""Per-feature embeddings of dense (float) features: piecewise-linear encoding on quantile bins.

One Linear over all dense columns into one token (what the student had) gives the backbone a linear function of
the dense features; a function of one feature (a threshold, a bump) or a product of two (x0 effect that depends on
x1) then has to be built by the backbone MLP from that one projection, which the student's few hundred steps do
not do (docs/LOG.md, 2026-12-02: capture of the world's sin(2 x0) x1 part 0.01). Here each feature gets its own
token: the feature's value is encoded piecewise-linearly on `bins` bins (Gorishniy et al. 2022, "On embeddings
for numerical features in tabular deep learning") and mapped by a per-feature linear layer, so each token is a
learned piecewise-linear function of its feature, and the FM dot of two tokens is a sum of products
f(x_i) g(x_j): the pairwise dense interactions the student's FM layer already gives its sparse fields.

The bin edges are quantiles of the feature over training rows (`fit`), kept as a buffer: checkpoints and the
exported program carry them, so serving takes the raw dense values as before. Outside the fitted range the
encoding saturates (the function is flat beyond the first and last edge, as a tree's is), so a served value far
outside the training range cannot blow a token up. Until `fit` runs the edges are those of a standard normal.
Pure PyTorch, export-friendly (no data-dependent control flow).
"""

from __future__ import annotations

import torch
from torch import nn

#: Training rows the bins' edges are fitted to (quantiles of each dense feature), by the student and the teacher.
FIT_ROWS = 8192
#: Smallest bin width: a feature with repeated values (binary, counts) has equal quantiles; such a bin becomes a
#: step at its edge instead of a division by zero.
MIN_WIDTH = 1e-6


def normal_edges(num: int, bins: int) -> torch.Tensor:
    """[num, bins + 1] edges at the standard normal's quantiles 0.5% .. 99.5% (the default before `fit`)."""
    # on the CPU whatever the default device: the sharded teacher is first built on the meta device, where
    # torch.distributions cannot validate its arguments (and meta tensors have no values to keep)
    q = torch.linspace(0.005, 0.995, bins + 1, dtype=torch.float64, device="cpu")
    e = (torch.special.erfinv(2 * q - 1) * 2 ** 0.5).float()  # the standard normal's inverse CDF
    return e.expand(num, bins + 1).clone()


def quantile_edges(x: torch.Tensor, bins: int) -> torch.Tensor:
    """[F, bins + 1] edges at the quantiles 0.5% .. 99.5% of each column of `x` [N, F] (non-finite values are
    skipped; a column with none gets the standard normal's)."""
    x = x.double()
    q = torch.linspace(0.005, 0.995, bins + 1, dtype=torch.float64)
    out = normal_edges(x.shape[1], bins).double()
    for f in range(x.shape[1]):
        col = x[:, f][torch.isfinite(x[:, f])]
        if col.numel():
            out[f] = torch.quantile(col, q)
    return out.float()


class DenseEmbedding(nn.Module):
    """[B, F] dense values -> [B, F, dim] tokens: per feature, a piecewise-linear encoding on `bins` bins then a
    linear map (see module docstring)."""

    def __init__(self, num: int, dim: int, bins: int = 16) -> None:
        super().__init__()
        if num < 1 or bins < 1:
            raise ValueError(f"DenseEmbedding needs at least one feature and one bin (got {num}, {bins})")
        self.num, self.dim, self.bins = num, dim, bins
        self.register_buffer("edges", normal_edges(num, bins))
        # each bin's encoding is in [0, 1]; a token sums up to `bins` of them: scale like nn.Linear(bins, dim)
        bound = 1.0 / bins ** 0.5
        self.weight = nn.Parameter(torch.empty(num, bins, dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(num, dim))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Set the bin edges from training rows `x` [N, F] (quantiles per feature)."""
        if x.ndim != 2 or x.shape[1] != self.num:
            raise ValueError(f"DenseEmbedding.fit: expected [N, {self.num}] values, got {tuple(x.shape)}")
        self.edges.copy_(quantile_edges(x, self.bins).to(self.edges.device))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, F] -> [B, F, bins]: bin k of feature f is 0 below its lower edge, 1 above its upper edge, linear
        between; the sum over bins is a monotone, saturating coordinate of the value."""
        lo, hi = self.edges[:, :-1], self.edges[:, 1:]
        width = (hi - lo).clamp(min=MIN_WIDTH)
        return ((x.unsqueeze(-1) - lo) / width).clamp(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the encoding in fp32 (edges and values), the map in the weights' dtype (bf16 in a bf16 teacher)
        return torch.einsum("bfk,fkd->bfd", self.encode(x.float()).to(self.weight.dtype), self.weight) + self.bias
