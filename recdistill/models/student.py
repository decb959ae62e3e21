"""The student: a small single-device ranking model with decoupled towers (Rec-Distill).

    backbone (shared): sparse-feature embeddings + dense projection + target attention over the last <= n events
       ├── main tower -> one head per task   (served; trained on the task loss only)
       └── aux tower  -> one head per task   (trained on task loss + beta * distillation loss)

The backbone receives gradients from both towers, so the teacher's knowledge reaches the served tower only
through shared representations — a broken teacher signal cannot pull the served predictions directly (risk
isolation). With `decoupled=False` there is one tower and the training code decides which losses it gets.
A student that sees fewer features than the teacher (pre-ranking) is `features=[...]`: it embeds only those.
Pure PyTorch: no parallelism, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recdistill.data.batch import Batch, History, Schema
from recdistill.models.embedding import _default_device

#: History fields the student embeds when present (timestamps and free-form fields are left out).
HISTORY_FIELDS = ("item", "cat", "action")


def recent_padded(history: History, n: int, fields: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The last `n` events of each row as right-aligned padded [B, n] id tensors (pad id 0) plus a [B, n] mask.

    Right-aligned: column n-1 is the most recent event, so position embeddings mean "steps ago".
    """
    lengths = history.lengths.clamp(max=n)
    b = lengths.numel()
    col = torch.arange(n, device=lengths.device).expand(b, n)
    mask = col >= (n - lengths).unsqueeze(1)
    # source position of column c in row i: end_i - (n - c); masked columns read row start (clamped) then zeroed
    src = (history.offsets[1:].unsqueeze(1) - (n - col)).clamp(min=0)
    out = {}
    for f in fields:
        vals = history.fields[f]
        ids = vals[src.clamp(max=max(vals.numel() - 1, 0))] if vals.numel() else torch.zeros_like(src)
        out[f] = torch.where(mask, ids, torch.zeros_like(ids))
    return out, mask


def mlp(d_in: int, hidden: int, depth: int) -> nn.Sequential:
    """depth x (Linear + SiLU), width `hidden`."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else hidden, hidden), nn.SiLU()]
    return nn.Sequential(*layers)


class TargetAttention(nn.Module):
    """One query (the candidate) attending over the recent history; rows with no history give zeros."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = torch.einsum("be,ble->bl", self.q(query), self.k(keys)) * self.scale
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # all-masked rows: softmax is NaN -> 0
        return torch.einsum("bl,ble->be", weights, keys)


@dataclass
class StudentOutput:
    """Raw (sampled-space) outputs per task: `main` always, `aux` only for the decoupled student."""

    main: dict[str, torch.Tensor]
    aux: dict[str, torch.Tensor] | None


class StudentModel(nn.Module):
    """Decoupled-tower student over a data Schema (see module docstring)."""

    def __init__(self, schema: Schema, *, features: list[str] | None = None, emb_dim: int = 16, hidden: int = 64,
                 depth: int = 2, history_len: int = 64, decoupled: bool = True, target_feature: str = "item_id"
                 ) -> None:
        super().__init__()
        unknown = sorted(set(features or []) - set(schema.sparse))
        if unknown:
            raise ValueError(f"student features {unknown} are not in the data (it has {sorted(schema.sparse)})")
        self.tasks = schema.task_names
        self.features = list(features) if features is not None else list(schema.sparse)
        self.history_len = history_len
        self.hist_fields = tuple(f for f in HISTORY_FIELDS if f in schema.history)
        self.target_feature = target_feature if target_feature in self.features and "item" in self.hist_fields else None
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=f"t_{f}", embedding_dim=emb_dim, num_embeddings=schema.sparse[f], feature_names=[f])
            for f in self.features], device=_default_device())
        self.hist_emb = nn.ModuleDict({f: nn.Embedding(schema.history[f], emb_dim) for f in self.hist_fields})
        self.pos_emb = nn.Parameter(torch.zeros(history_len, emb_dim))
        self.attn = TargetAttention(emb_dim) if self.hist_fields else None
        self.dense_proj = nn.Linear(len(schema.dense), emb_dim) if schema.dense else None
        d_in = emb_dim * (len(self.features) + (1 if schema.dense else 0) + (2 if self.hist_fields else 0))
        self.backbone = mlp(d_in, hidden, depth)
        self.main = self._tower(hidden, depth)
        self.aux = self._tower(hidden, depth) if decoupled else None

    def _tower(self, hidden: int, depth: int) -> nn.ModuleDict:
        return nn.ModuleDict({"body": mlp(hidden, hidden, max(depth - 1, 1)),
                              "heads": nn.ModuleDict({t: nn.Linear(hidden, 1) for t in self.tasks})})

    @staticmethod
    def _run_tower(tower: nn.ModuleDict, h: torch.Tensor) -> dict[str, torch.Tensor]:
        z = tower["body"](h)
        return {t: head(z).squeeze(-1) for t, head in tower["heads"].items()}

    def encode(self, batch: Batch) -> torch.Tensor:
        """Shared backbone representation [B, hidden]."""
        pooled = self.ebc(batch.sparse).to_dict()  # index by key: sharded/ordered outputs differ (DESIGN §5)
        parts = [pooled[f] for f in self.features]
        if self.dense_proj is not None:
            parts.append(self.dense_proj(batch.dense))
        if self.hist_fields:
            ids, mask = recent_padded(batch.history, self.history_len, self.hist_fields)
            events = sum(self.hist_emb[f](ids[f]) for f in self.hist_fields) + self.pos_emb
            events = events * mask.unsqueeze(-1)
            count = mask.sum(1, keepdim=True).clamp(min=1)
            mean = events.sum(1) / count
            query = self.hist_emb["item"](batch.sparse[self.target_feature].to_padded_dense(1).squeeze(1)) \
                if self.target_feature is not None else mean
            parts += [self.attn(query, events, mask), mean]
        return self.backbone(torch.cat(parts, dim=1))

    def forward(self, batch: Batch) -> StudentOutput:
        h = self.encode(batch)
        return StudentOutput(main=self._run_tower(self.main, h),
                             aux=self._run_tower(self.aux, h) if self.aux is not None else None)
