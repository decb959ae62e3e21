"""The teacher: embeddings -> LONGER over the long history -> TokenMixer-Large -> one raw logit per task.

    global tokens = [CLS, target item, target category, user, dense context] (projected to the LONGER width)
    history events = sum of the events' field embeddings (item, cat, action), the last `history_len` events
    LONGER(global tokens, events) -> query outputs; flattened with pooled categorical embeddings and the dense
    projection into one feature vector -> TokenMixer-Large -> mean over tokens -> per-task heads (raw logits)

Outputs are raw, sampled-space logits (the teacher's own SamplingConfig applies); the signal writer stores them
as they are. Continuous tasks output the predicted value directly.

Finding what the long history knows (which categories a user keeps coming back to) takes matching the events'
categories against the candidate's. Two parts do it: the target's category is a LONGER query of its own (a query
made from the item id alone has to learn each item's category before attention can match anything), and a few
parameter-free target-match statistics of the visible history (SIM-style hard search by category: share and
log-count of the events in the candidate's category over the last 8, 64 and `history_len` events, plus the log
history length) go into TokenMixer. On the synthetic world the LONGER encoder alone made a 1,024-event history
score the same as a 128-event one (benchmarks/teacher_scaling.py: their predictions correlated at 0.9997).
Pure PyTorch: the training code shards the
embedding collections and wraps the rest.
"""

from __future__ import annotations

import torch
from torch import nn

from recdistill.data.batch import Batch, Schema
from recdistill.models.embedding import HistoryEmbeddings, SparseEmbeddings
from recdistill.models.longer import LongerEncoder
from recdistill.models.match import NUM_MATCH, target_match
from recdistill.models.tokenmixer import TokenMixerLarge

HISTORY_FIELDS = ("item", "cat", "action")


class TeacherEmbeddings(nn.Module):
    """The sparse part: pooled categorical embeddings and per-event history embeddings (the modules DMP shards)."""

    def __init__(self, schema: Schema, cfg, category_feature: str = "item_cat") -> None:  # noqa: ANN001
        super().__init__()
        self.history_len = cfg.history_len
        self.category_feature = category_feature if category_feature in schema.sparse and "cat" in schema.history \
            else None
        hist_fields = {f: schema.history[f] for f in HISTORY_FIELDS if f in schema.history}
        if "item" not in hist_fields:
            raise ValueError(f"the teacher needs the history field 'item'; the data has {sorted(schema.history)}")
        self.sparse = SparseEmbeddings(schema.sparse, cfg.emb_dim, cfg.embedding_backend)
        self.history = HistoryEmbeddings(hist_fields, cfg.emb_dim, cfg.embedding_backend)

    def forward(self, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(pooled embedding per feature [B, E], event embeddings [N, E], history offsets [B+1], target-match
        statistics [B, NUM_MATCH] or None when the data has no category)."""
        hist = batch.history.last(self.history_len)
        match = None
        if self.category_feature is not None:
            jt = batch.sparse[self.category_feature]  # one category per candidate
            cand = jt.values()[jt.offsets()[:-1]] if jt.values().numel() else jt.values()
            match = target_match(cand, hist.fields["cat"], hist.offsets)
        return self.sparse(batch.sparse), self.history(hist), hist.offsets, match


class TeacherDense(nn.Module):
    """The dense part (what DeepSpeed wraps): LONGER + TokenMixer-Large + task heads."""

    def __init__(self, schema: Schema, cfg, target_feature: str = "item_id", user_feature: str = "user_id",  # noqa: ANN001
                 category_feature: str = "item_cat") -> None:
        super().__init__()
        self.tasks = schema.task_names
        e, dl = cfg.emb_dim, cfg.longer_dim
        self.features = sorted(schema.sparse)
        self.target_feature = target_feature if target_feature in schema.sparse else None
        self.category_feature = category_feature if category_feature in schema.sparse else None
        self.user_feature = user_feature if user_feature in schema.sparse else None
        self.dense_proj = nn.Linear(len(schema.dense), e) if schema.dense else None
        has_match = self.category_feature is not None and "cat" in schema.history
        self.match_proj = nn.Linear(NUM_MATCH, e) if has_match else None
        # LONGER's global query tokens: CLS, target item, category, user, dense context (those present)
        self.n_global = 1 + sum(x is not None for x in (self.target_feature, self.category_feature,
                                                        self.user_feature, self.dense_proj))
        self.cls = nn.Parameter(torch.randn(1, 1, dl) * 0.02)
        self.global_proj = nn.Linear(e, dl)
        self.longer = LongerEncoder(e, dl, heads=cfg.longer_heads, layers=cfg.longer_layers, merge_k=cfg.merge_k,
                                    recent=cfg.recent_k, merge_kind=cfg.merge_kind)
        n_feat = e * len(schema.sparse) + (e if schema.dense else 0) + (e if has_match else 0)
        self.n_seq = n_seq = dl * (self.n_global + cfg.recent_k)  # LONGER's outputs in the mixer input
        groups = [(n_feat, cfg.feature_tokens), (n_seq, cfg.num_tokens - cfg.feature_tokens)] \
            if cfg.feature_tokens else None  # features first: forward concatenates them before LONGER's outputs
        self.mixer = TokenMixerLarge(n_feat + n_seq, tokens=cfg.num_tokens, dim=cfg.d_model, ffn_mult=cfg.ffn_mult,
                                     layers=cfg.num_layers, experts=cfg.moe_experts, topk=cfg.moe_topk,
                                     groups=groups)
        self.heads = nn.ModuleDict({t: nn.Linear(cfg.d_model, 1) for t in self.tasks})

    def forward(self, pooled: dict[str, torch.Tensor], dense: torch.Tensor, events: torch.Tensor,
                offsets: torch.Tensor, match: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        parts = [pooled[f] for f in self.features]
        if self.match_proj is not None:
            parts.append(self.match_proj(match))
        glob = [pooled[f] for f in (self.target_feature, self.category_feature, self.user_feature) if f is not None]
        if self.dense_proj is not None:
            d = self.dense_proj(dense)
            parts.append(d)
            glob.append(d)
        b = dense.shape[0]
        glob_tokens = self.cls.expand(b, -1, -1)
        if glob:
            glob_tokens = torch.cat([glob_tokens, self.global_proj(torch.stack(glob, 1))], 1)
        seq = self.longer(glob_tokens, events, offsets)
        tokens = self.mixer(torch.cat([*parts, seq.flatten(1)], dim=1))
        pooled_tokens = tokens.mean(dim=1)
        return {t: head(pooled_tokens).squeeze(-1) for t, head in self.heads.items()}


class TeacherModel(nn.Module):
    """TokenMixer-Large + LONGER ranking model over a data Schema; `cfg` is a TeacherConfig.

    Two children so the training code can parallelize each its own way: `embed` (TorchRec collections, sharded
    by DMP) and `dense` (wrapped by DeepSpeed ZeRO).
    """

    def __init__(self, schema: Schema, cfg, target_feature: str = "item_id", user_feature: str = "user_id",  # noqa: ANN001
                 category_feature: str = "item_cat") -> None:
        super().__init__()
        self.tasks = schema.task_names
        self.embed = TeacherEmbeddings(schema, cfg, category_feature)
        self.dense = TeacherDense(schema, cfg, target_feature, user_feature, category_feature)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Raw (teacher sampled-space) logits per task, [B] each."""
        pooled, events, offsets, match = self.embed(batch)
        return self.dense(pooled, batch.dense, events, offsets, match)
