"""Embedding front ends: pooled categorical features and per-event history embeddings.

Two backends with the same outputs: 'torchrec' (EmbeddingBagCollection / EmbeddingCollection, which the training
code can shard with DistributedModelParallel) and 'torch' (nn.EmbeddingBag / nn.Embedding), for machines where
TorchRec's GPU kernels are missing (DESIGN §5). Model code only builds plain modules; sharding lives in
recdistill/train/parallelize.py.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recdistill.data.batch import History

Backend = Literal["torchrec", "torch"]


def _default_device() -> torch.device:
    """The device new tensors go to (honours `with torch.device("meta"):`, which TorchRec modules otherwise
    ignore): lets a billion-parameter model be built without memory for a dry run."""
    return torch.empty(0).device


class SparseEmbeddings(nn.Module):
    """Sum-pooled embedding per categorical feature: KJT -> {feature: [B, dim]}."""

    def __init__(self, cardinalities: dict[str, int], dim: int, backend: Backend = "torchrec") -> None:
        super().__init__()
        self.features, self.backend = list(cardinalities), backend
        if backend == "torchrec":
            self.ebc = EmbeddingBagCollection(tables=[
                EmbeddingBagConfig(name=f"t_{f}", embedding_dim=dim, num_embeddings=n, feature_names=[f])
                for f, n in cardinalities.items()], device=_default_device())
        else:
            self.bags = nn.ModuleDict({f: nn.EmbeddingBag(n, dim, mode="sum") for f, n in cardinalities.items()})

    def forward(self, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        if self.backend == "torchrec":
            return self.ebc(kjt).to_dict()  # by key: sharded outputs come back in sharding order (DESIGN §5)
        out = {}
        for f in self.features:
            jt = kjt[f]
            out[f] = self.bags[f](jt.values(), jt.offsets()[:-1])
        return out


class HistoryEmbeddings(nn.Module):
    """Per-event embedding: sum over the history fields' embeddings, jagged [N, dim] aligned with history values."""

    def __init__(self, cardinalities: dict[str, int], dim: int, backend: Backend = "torchrec") -> None:
        super().__init__()
        self.fields, self.backend = list(cardinalities), backend
        if backend == "torchrec":
            self.ec = EmbeddingCollection(tables=[
                EmbeddingConfig(name=f"h_{f}", embedding_dim=dim, num_embeddings=n, feature_names=[f"hist_{f}"])
                for f, n in cardinalities.items()], device=_default_device())
        else:
            self.tables = nn.ModuleDict({f: nn.Embedding(n, dim) for f, n in cardinalities.items()})

    def forward(self, history: History) -> torch.Tensor:
        if self.backend == "torch":
            return sum(self.tables[f](history.fields[f]) for f in self.fields)
        lengths = history.lengths
        kjt = KeyedJaggedTensor(keys=[f"hist_{f}" for f in self.fields],
                                values=torch.cat([history.fields[f] for f in self.fields]),
                                lengths=lengths.repeat(len(self.fields)))
        out = self.ec(kjt)
        return sum(out[f"hist_{f}"].values() for f in self.fields)
