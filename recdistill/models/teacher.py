"""The teacher: embeddings -> LONGER over the long history -> TokenMixer-Large -> one raw logit per task.

    global tokens = [CLS, target item, target category, user, dense context] (projected to the LONGER width)
    history events = sum of the events' field embeddings (item, category, action), the last `history_len` events

Which sparse features are the target item, its category and the user, and which history fields hold the events'
items, categories and actions, comes from a `Roles` (recdistill/data/batch.py), never from literal names; a role
that is None drops what needs it (the trainers report that at start).
    LONGER(global tokens, events) -> query outputs; flattened with pooled categorical embeddings and the dense
    projection into one feature vector -> TokenMixer-Large -> mean over tokens -> per-task heads (raw logits)

Outputs are raw, sampled-space logits (the teacher's own SamplingConfig applies); the signal writer stores them
as they are. Continuous tasks output the predicted value directly.

Finding what the long history knows (which categories a user keeps coming back to) takes matching the events'
categories against the candidate's. Two parts do it: the target's category is a LONGER query of its own (a query
made from the item id alone has to learn each item's category before attention can match anything), and a few
parameter-free target-match statistics of the visible history (SIM-style hard search by category: share and
log-count of the events in the candidate's category over the last 8, 64 and `history_len` events, plus the log
history length) go into TokenMixer. Without them the LONGER encoder alone could not tell a long history from a
short one on the synthetic world (docs/LOG.md). Pure PyTorch: the training code shards the embedding collections
and wraps the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from recdistill.data.batch import CONVENTIONAL_ROLES, Batch, Roles, Schema
from recdistill.models.cross import Cross, crossed_kjt, plan_crosses
from recdistill.models.dense import DenseEmbedding
from recdistill.models.embedding import HistoryEmbeddings, SparseEmbeddings
from recdistill.models.longer import LongerEncoder
from recdistill.models.match import NUM_MATCH, target_match
from recdistill.models.tokenmixer import TokenMixerLarge


def teacher_roles(schema: Schema, roles: Roles | None) -> Roles:
    """`roles` checked against `schema`; None: the conventional names the schema has (callers that build a model
    directly; the trainers pass resolved roles and report what is missing, recdistill/data/roles.py)."""
    if roles is None:
        return CONVENTIONAL_ROLES.present_in(schema)
    roles.check(schema)
    return roles


class TeacherEmbeddings(nn.Module):
    """The sparse part: pooled categorical embeddings and per-event history embeddings (the modules DMP shards)."""

    def __init__(self, schema: Schema, cfg, roles: Roles | None = None) -> None:  # noqa: ANN001
        super().__init__()
        roles = teacher_roles(schema, roles)
        self.history_len = cfg.history_len
        if roles.hist_item is None:
            raise ValueError(f"the teacher needs a history field of item ids (data.roles.hist_item); the data has "
                             f"{sorted(schema.history)}")
        # the target-match statistics compare the candidate's category with the events' categories: both needed
        has_match = roles.category is not None and roles.hist_category is not None
        self.category_feature = roles.category if has_match else None
        self.hist_category = roles.hist_category if has_match else None
        hist_fields = {f: schema.history[f] for f in roles.history_fields}
        self.cardinalities = dict(schema.sparse)
        self.crosses = teacher_crosses(schema, roles, cfg)
        tables = self.cardinalities | {c.name: c.size for c in self.crosses}
        self.sparse = SparseEmbeddings(tables, cfg.emb_dim, cfg.embedding_backend)
        self.history = HistoryEmbeddings(hist_fields, cfg.emb_dim, cfg.embedding_backend)

    def forward(self, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(pooled embedding per feature [B, E], event embeddings [N, E], history offsets [B+1], target-match
        statistics [B, NUM_MATCH] or None when the data has no category)."""
        hist = batch.history.last(self.history_len)
        match = None
        if self.category_feature is not None:
            jt = batch.sparse[self.category_feature]  # one category per candidate
            cand = jt.values()[jt.offsets()[:-1]] if jt.values().numel() else jt.values()
            match = target_match(cand, hist.fields[self.hist_category], hist.offsets)
        sparse = crossed_kjt(batch.sparse, self.crosses, self.cardinalities)
        return self.sparse(sparse), self.history(hist), hist.offsets, match


def _role_key(roles: Roles):  # noqa: ANN202 - a sort key
    """Sort key of sparse features: a role's feature sorts under the role's conventional name."""
    alias = {getattr(roles, k): getattr(CONVENTIONAL_ROLES, k) for k in Roles.SPARSE if getattr(roles, k)}
    return lambda f: (alias.get(f, f), f)


def teacher_crosses(schema: Schema, roles: Roles, cfg) -> list[Cross]:  # noqa: ANN001
    """The crossed features of `cfg.crosses` (recdistill/models/cross.py) over the data's sparse features."""
    return plan_crosses(schema.sparse, cfg.crosses, max_vocab=cfg.cross_max_vocab, order=cfg.cross_order,
                        buckets=cfg.cross_buckets, sort_key=_role_key(roles))


def feature_order(schema: Schema, roles: Roles, crosses: Sequence[Cross] = ()) -> list[str]:
    """The order in which the pooled sparse features enter TokenMixer: sorted, with a role's feature sorted under
    the role's conventional name, so that what a user calls the user, item and category columns does not change
    the model (the same data under two namings gives the same layout and, under one seed, the same weights);
    the crossed features follow in their planned order."""
    return sorted(schema.sparse, key=_role_key(roles)) + [c.name for c in crosses]


class TeacherDense(nn.Module):
    """The dense part (what DeepSpeed wraps): LONGER + TokenMixer-Large + task heads."""

    def __init__(self, schema: Schema, cfg, roles: Roles | None = None) -> None:  # noqa: ANN001
        super().__init__()
        roles = teacher_roles(schema, roles)
        self.tasks = schema.task_names
        e, dl = cfg.emb_dim, cfg.longer_dim
        self.features = feature_order(schema, roles, teacher_crosses(schema, roles, cfg))
        self.target_feature, self.category_feature, self.user_feature = roles.item, roles.category, roles.user
        self.dense_proj = nn.Linear(len(schema.dense), e) if schema.dense else None
        has_match = self.category_feature is not None and roles.hist_category is not None
        self.match_proj = nn.Linear(NUM_MATCH, e) if has_match else None
        # LONGER's global query tokens: CLS, target item, category, user, dense context (those present)
        self.n_global = 1 + sum(x is not None for x in (self.target_feature, self.category_feature,
                                                        self.user_feature, self.dense_proj))
        self.cls = nn.Parameter(torch.randn(1, 1, dl) * 0.02)
        self.global_proj = nn.Linear(e, dl)
        ckpt = cfg.activation_checkpointing == "block"  # recompute each LONGER layer and TokenMixer block
        self.longer = LongerEncoder(e, dl, heads=cfg.longer_heads, layers=cfg.longer_layers, merge_k=cfg.merge_k,
                                    recent=cfg.recent_k, merge_kind=cfg.merge_kind, checkpointing=ckpt)
        n_feat = e * len(self.features) + (e if schema.dense else 0) + (e if has_match else 0)
        self.n_seq = n_seq = dl * (self.n_global + cfg.recent_k)  # LONGER's outputs in the mixer input
        groups = [(n_feat, cfg.feature_tokens), (n_seq, cfg.num_tokens - cfg.feature_tokens)] \
            if cfg.feature_tokens else None  # features first: forward concatenates them before LONGER's outputs
        self.mixer = TokenMixerLarge(n_feat + n_seq, tokens=cfg.num_tokens, dim=cfg.d_model, ffn_mult=cfg.ffn_mult,
                                     layers=cfg.num_layers, experts=cfg.moe_experts, topk=cfg.moe_topk,
                                     groups=groups, checkpointing=ckpt)
        self.heads = nn.ModuleDict({t: nn.Linear(cfg.d_model, 1) for t in self.tasks})
        # dense=bins: per-feature piecewise-linear functions summed into the dense token beside the Linear (a linear
        # map of all features' bin encodings). Built last and zero-initialised: under one seed, training starts from
        # exactly the linear teacher.
        self.dense_bins = DenseEmbedding(len(schema.dense), e, cfg.dense_bins) \
            if schema.dense and cfg.dense == "bins" else None
        if self.dense_bins is not None:
            nn.init.zeros_(self.dense_bins.weight)

    def forward(self, pooled: dict[str, torch.Tensor], dense: torch.Tensor, events: torch.Tensor,
                offsets: torch.Tensor, match: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Raw logits per task, fp32 whatever the module's dtype. The inputs (TorchRec's fp32 embedding outputs,
        the batch's fp32 dense features and target-match statistics) are cast here, once, to the module's dtype:
        fp32, or bf16 once DeepSpeed's bf16 mode has cast the module (teacher.precision). An explicit cast rather
        than autocast: under DeepSpeed's bf16 mode the weights themselves are bf16, so every op should see bf16
        inputs, and autocast casts only the ops on its list (RMSNorm is not: under CPU autocast an fp32 input with
        bf16 weights falls off the fused kernel and comes out fp32, so the activations after it are fp32 again);
        and the dtype then follows the module, not a context the caller has to remember."""
        dt = self.cls.dtype
        pooled = {f: v.to(dt) for f, v in pooled.items()}
        dense, events = dense.to(dt), events.to(dt)
        match = match.to(dt) if match is not None else None
        parts = [pooled[f] for f in self.features]
        if self.match_proj is not None:
            parts.append(self.match_proj(match))
        glob = [pooled[f] for f in (self.target_feature, self.category_feature, self.user_feature) if f is not None]
        if self.dense_proj is not None:
            d = self.dense_proj(dense)
            if self.dense_bins is not None:
                d = d + self.dense_bins(dense).sum(1)
            parts.append(d)
            glob.append(d)
        b = dense.shape[0]
        glob_tokens = self.cls.expand(b, -1, -1)
        if glob:
            glob_tokens = torch.cat([glob_tokens, self.global_proj(torch.stack(glob, 1))], 1)
        seq = self.longer(glob_tokens, events, offsets)
        tokens = self.mixer(torch.cat([*parts, seq.flatten(1)], dim=1))
        pooled_tokens = tokens.mean(dim=1)
        # fp32 out: losses, the logits written to the signal store and eval predictions are fp32 in every precision
        return {t: head(pooled_tokens).squeeze(-1).float() for t, head in self.heads.items()}


class TeacherModel(nn.Module):
    """TokenMixer-Large + LONGER ranking model over a data Schema; `cfg` is a TeacherConfig.

    Two children so the training code can parallelize each its own way: `embed` (TorchRec collections, sharded
    by DMP) and `dense` (wrapped by DeepSpeed ZeRO).
    """

    def __init__(self, schema: Schema, cfg, roles: Roles | None = None) -> None:  # noqa: ANN001
        super().__init__()
        self.tasks = schema.task_names
        self.roles = teacher_roles(schema, roles)
        self.embed = TeacherEmbeddings(schema, cfg, self.roles)
        self.dense = TeacherDense(schema, cfg, self.roles)

    def fit_dense(self, dense: torch.Tensor) -> None:
        """Fit the dense bins' quantile edges to training rows `dense` [N, Fd] (a no-op for teacher.dense=linear).
        Kept as a buffer, so checkpoints carry them."""
        if self.dense.dense_bins is not None:
            self.dense.dense_bins.fit(dense)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Raw (teacher sampled-space) logits per task, [B] each."""
        pooled, events, offsets, match = self.embed(batch)
        return self.dense(pooled, batch.dense, events, offsets, match)
