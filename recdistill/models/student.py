"""The student: a small single-device ranking model with decoupled towers (Rec-Distill).

    backbone (shared): sparse-feature embeddings + dense-feature tokens + target attention over the last <= n events
                       (+ optionally a per-user category summary of a much longer history, `summary_len`)
       ├── main tower -> one head per task   (served; trained on the task loss only)
       └── aux tower  -> one head per task   (trained on task loss + beta * distillation loss)

The backbone receives gradients from both towers, so the teacher's knowledge reaches the served tower only
through shared representations — a broken teacher signal cannot pull the served predictions directly (risk
isolation). With `decoupled=False` there is one tower and the training code decides which losses it gets.
A student that sees fewer features than the teacher (pre-ranking) is `features=[...]`: it embeds only those.
The candidate item, its category and the history fields come from a `Roles` (recdistill/data/batch.py).
Pure PyTorch: no parallelism, no I/O.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recdistill.data.batch import CONVENTIONAL_ROLES, Batch, History, Roles, Schema
from recdistill.models.cross import Cross, cross_ids, first_or_missing
from recdistill.models.dense import DenseEmbedding
from recdistill.models.embedding import _default_device
from recdistill.models.match import NUM_MATCH, NUM_SUMMARY, history_summary, summary_match, target_match_padded

#: How the student reads the dense features (StudentConfig.dense).
DENSE_MODES = ("linear", "bins", "linear+bins")


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
    hint: torch.Tensor | None = None  # [B, hint_dim]: the hint head's prediction of the teacher's representation


class StudentModel(nn.Module):
    """Decoupled-tower student over a data Schema (see module docstring)."""

    def __init__(self, schema: Schema, *, features: list[str] | None = None, emb_dim: int = 16, hidden: int = 64,
                 depth: int = 2, history_len: int = 64, decoupled: bool = True, roles: Roles | None = None,
                 interactions: bool = True, match_features: bool = True, crosses: Sequence[Cross] = (),
                 summary_len: int = 0, dense: str = "linear", dense_bins: int = 16, hint_dim: int = 0) -> None:
        super().__init__()
        unknown = sorted(set(features or []) - set(schema.sparse))
        if unknown:
            raise ValueError(f"student features {unknown} are not in the data (it has {sorted(schema.sparse)})")
        if roles is None:  # built directly: the conventional names the data has (trainers pass resolved roles)
            roles = CONVENTIONAL_ROLES.present_in(schema)
        roles.check(schema)
        self.roles, self.tasks = roles, schema.task_names
        self.features = list(features) if features is not None else list(schema.sparse)
        # crossed features (recdistill/models/cross.py) of the embedded features: computed inside the model from
        # the raw ids, so the served program takes the same inputs with or without them
        outside = sorted({f for c in crosses for f in c.fields} - set(self.features))
        if outside:
            raise ValueError(f"student crosses use features {outside} that the student does not embed")
        self.crosses = list(crosses)
        self.cardinality = {f: schema.sparse[f] for f in self.features}
        self.history_len = history_len
        # embedded history fields: the events' items, categories, actions (those the roles name; timestamps and
        # free-form fields are left out), in that order
        self.hist_fields = roles.history_fields if history_len > 0 else ()
        # `target_feature` / `match_cat`: the sparse features (names) of the candidate item and its category, or
        # None when the student does without target attention / target-match statistics
        self.target_feature = roles.item if roles.item in self.features and roles.hist_item in self.hist_fields \
            else None
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=f"t_{f}", embedding_dim=emb_dim, num_embeddings=schema.sparse[f], feature_names=[f])
            for f in self.features] + [
            EmbeddingBagConfig(name=f"t_{c.name}", embedding_dim=emb_dim, num_embeddings=c.size, feature_names=[c.name])
            for c in self.crosses], device=_default_device())
        # The candidate item is looked up in the history's item table (target attention): the table covers both id
        # ranges, since a Parquet directory without declared cardinalities infers each from its own column's max id
        # and a candidate may never appear in any history.
        rows = {f: max(schema.history[f], schema.sparse[roles.item]) if self.target_feature and f == roles.hist_item
                else schema.history[f] for f in self.hist_fields}
        self.hist_emb = nn.ModuleDict({f: nn.Embedding(rows[f], emb_dim) for f in self.hist_fields})
        self.pos_emb = nn.Parameter(torch.zeros(history_len, emb_dim))
        self.attn = TargetAttention(emb_dim) if self.hist_fields else None
        # Dense features: 'bins' one token per feature, a learned piecewise-linear function of its value on
        # quantile bins (models/dense.py; `fit_dense` sets the bins from training rows); 'linear' (the default) one
        # Linear of all of them into one token. One linear token gives the backbone only a linear function of the dense
        # features: on a world whose dense part has a product of two features, the student learned none of it
        # (docs/LOG.md).
        # 'linear+bins' both: the linear token beside the per-feature ones (bins alone followed the linear dense part
        # less on the demo world).
        if dense not in DENSE_MODES:
            modes = ", ".join(map(repr, DENSE_MODES))
            raise ValueError(f"student dense encoding must be one of {modes}, got {dense!r}")
        self.dense_mode = dense if schema.dense else None
        linear, bins = self.dense_mode in ("linear", "linear+bins"), self.dense_mode in ("bins", "linear+bins")
        self.dense_proj = nn.Linear(len(schema.dense), emb_dim) if linear else None
        self.dense_emb = DenseEmbedding(len(schema.dense), emb_dim, dense_bins) if bins else None
        n_dense = int(linear) + (len(schema.dense) if bins else 0)
        # Target-match statistics (SIM-style hard search by category, the teacher has them too over its longer
        # window): how much of the student's own recent history is in the candidate's category.
        self.match_cat = roles.category if match_features and roles.hist_category in self.hist_fields \
            and roles.category in self.features else None
        self.match_proj = nn.Linear(NUM_MATCH, emb_dim) if self.match_cat else None
        # Long-history summary: the category counts of the user's last `summary_len` events, one [C] vector per
        # request (models/match.py history_summary). Two fields come of it: the candidate category's match statistics,
        # and a long-term interest vector (the category shares times a learned category embedding), whose FM dot
        # with the candidate's category embedding is a user x category affinity over the long history.
        self.summary_len, self.summary_field, self.summary_cats = 0, None, 0
        if summary_len > 0:
            if roles.hist_category not in schema.history or roles.category not in self.features:
                raise ValueError(f"summary_len={summary_len} needs the history's category field "
                                 f"'{roles.hist_category}' and the candidate's category feature '{roles.category}' "
                                 f"among the student's features (history fields {sorted(schema.history)}, "
                                 f"features {self.features})")
            self.summary_len, self.summary_field = summary_len, roles.hist_category
            self.summary_cats = schema.history[roles.hist_category]
        self.summary_proj = nn.Linear(NUM_SUMMARY, emb_dim) if self.summary_len else None
        self.summary_emb = nn.Linear(self.summary_cats, emb_dim, bias=False) if self.summary_len else None
        n_vec = len(self.features) + len(self.crosses) + n_dense + (2 if self.hist_fields else 0) \
            + (1 if self.match_cat else 0) + (2 if self.summary_len else 0)
        # FM-style pairwise dot products of the field vectors: an MLP over concatenated embeddings approximates a
        # product of two of them (user x category affinity, say) poorly; ranking models add explicit crosses.
        self.interactions, self.dot_scale = interactions, 1.0 / math.sqrt(emb_dim)
        d_in = emb_dim * n_vec + (n_vec * (n_vec - 1) // 2 if interactions else 0)
        self.backbone = mlp(d_in, hidden, depth)
        self.main = self._tower(hidden, depth)
        self.aux = self._tower(hidden, depth) if decoupled else None
        # Representation hint (student.hint_weight): a linear map of the backbone onto the teacher's representation,
        # trained beside the towers and, like the aux tower, never served.
        self.hint = nn.Linear(hidden, hint_dim) if hint_dim else None

    def _tower(self, hidden: int, depth: int) -> nn.ModuleDict:
        return nn.ModuleDict({"body": mlp(hidden, hidden, max(depth - 1, 1)),
                              "heads": nn.ModuleDict({t: nn.Linear(hidden, 1) for t in self.tasks})})

    @staticmethod
    def _run_tower(tower: nn.ModuleDict, h: torch.Tensor) -> dict[str, torch.Tensor]:
        z = tower["body"](h)
        return {t: head(z).squeeze(-1) for t, head in tower["heads"].items()}

    def encode(self, batch: Batch) -> torch.Tensor:
        """Shared backbone representation [B, hidden]."""
        return self.encode_tensors(*model_inputs(self, batch))

    def pool(self, values: dict[str, torch.Tensor], lengths: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum-pooled embeddings [B, E] per feature from its ids `values[f]` [N_f] and per-row counts `lengths[f]` [B].

        Each feature's table is the EBC's own EmbeddingBag, called on (values, offsets) exactly as
        EmbeddingBagCollection.forward calls it, so parameters, state-dict names and numbers are the EBC's. The
        EBC's forward itself is not used: it takes a KeyedJaggedTensor, whose stride and per-key lengths are Python
        ints, so torch.export specialises the batch size on it; plain tensors keep every size dynamic, and training
        and serving then run this one function.
        """
        out = {}
        for f in self.features:
            bag = self.ebc.embedding_bags[f"t_{f}"]
            out[f] = bag(input=values[f], offsets=_offsets(lengths[f])).float()
        if self.crosses:
            ids = {f: first_or_missing(values[f], lengths[f], self.cardinality[f])
                   for f in {f for c in self.crosses for f in c.fields}}
            one = _offsets(torch.ones_like(lengths[self.crosses[0].fields[0]]))  # one cross id per row
            for c in self.crosses:
                out[c.name] = self.ebc.embedding_bags[f"t_{c.name}"](input=cross_ids(c, ids), offsets=one).float()
        return out

    def encode_tensors(self, values: dict[str, torch.Tensor], lengths: dict[str, torch.Tensor], dense: torch.Tensor,
                       hist_ids: dict[str, torch.Tensor], hist_mask: torch.Tensor,
                       summary: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone on plain tensors (`model_inputs` builds them from a Batch): what `encode` and the served
        module both run. Target item / candidate category: the first id of that feature in the row (0 if none)."""
        pooled = self.pool(values, lengths)
        target = first_id(values[self.target_feature], lengths[self.target_feature]) \
            if self.target_feature is not None else None
        cat = self.roles.category
        cand_cat = first_id(values[cat], lengths[cat]) if self.match_cat or self.summary_len else None
        return self.encode_parts(pooled, dense, hist_ids, hist_mask if self.hist_fields else None, target, cand_cat,
                                 summary)

    def encode_parts(self, pooled: dict[str, torch.Tensor], dense: torch.Tensor, hist_ids: dict[str, torch.Tensor],
                     hist_mask: torch.Tensor | None, target: torch.Tensor | None,
                     cand_cat: torch.Tensor | None = None, summary: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone from pooled [B, E] per feature, dense [B, Fd], right-aligned history ids [B, n] per field
        with their mask, target item ids [B], candidate categories [B] and the long-history summary [B, C]."""
        parts = [pooled[f] for f in self.features] + [pooled[c.name] for c in self.crosses]
        if self.dense_proj is not None:
            parts.append(self.dense_proj(dense))
        if self.dense_emb is not None:
            parts += list(self.dense_emb(dense).unbind(1))
        if self.hist_fields:
            events = sum(self.hist_emb[f](hist_ids[f]) for f in self.hist_fields) + self.pos_emb
            events = events * hist_mask.unsqueeze(-1)
            count = hist_mask.sum(1, keepdim=True).clamp(min=1)
            mean = events.sum(1) / count
            query = self.hist_emb[self.roles.hist_item](target) if target is not None else mean
            parts += [self.attn(query, events, hist_mask), mean]
        if self.match_proj is not None:
            parts.append(self.match_proj(target_match_padded(cand_cat, hist_ids[self.roles.hist_category], hist_mask)))
        if self.summary_proj is not None:
            parts.append(self.summary_proj(summary_match(summary, cand_cat)))
            parts.append(self.summary_emb(summary / summary.sum(1, keepdim=True).clamp(min=1)))
        if self.interactions:
            vecs = torch.stack(parts, dim=1)  # [B, n, E]
            dots = torch.bmm(vecs, vecs.transpose(1, 2)) * self.dot_scale  # 1/sqrt(E): unit-size inputs
            i, j = torch.triu_indices(vecs.shape[1], vecs.shape[1], offset=1, device=vecs.device)
            parts.append(dots[:, i, j])
        return self.backbone(torch.cat(parts, dim=1))

    def fit_dense(self, dense: torch.Tensor) -> None:
        """Fit the dense encoding to training rows `dense` [N, Fd] (the bins' quantile edges; a no-op for the
        'linear' encoding or a schema without dense features). Kept in the state dict and the exported program."""
        if self.dense_emb is not None:
            self.dense_emb.fit(dense)

    def without_aux(self) -> StudentModel:
        """A view of this model without the auxiliary tower and the hint head: the same parameter tensors (no
        copy), so serving code built on it holds and exports only the backbone and the main tower."""
        view = copy.copy(self)
        # a new dict: self keeps its aux and hint
        view._modules = {k: v for k, v in self._modules.items() if k not in ("aux", "hint")}
        view.aux = view.hint = None
        return view

    def forward(self, batch: Batch) -> StudentOutput:
        h = self.encode(batch)
        return StudentOutput(main=self._run_tower(self.main, h),
                             aux=self._run_tower(self.aux, h) if self.aux is not None else None,
                             hint=self.hint(h) if self.hint is not None else None)


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    """[B] lengths -> [B+1] offsets; a cat rather than an `out=` slice, which torch.export traces as a mutation."""
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


def first_id(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The first id of each row of a jagged feature, 0 for rows with none (what `to_padded_dense(1)` gives).

    One zero is appended so that the start of an empty last row (== N, or 0 when N == 0) can be read without a
    data-dependent branch, which would specialise an exported program."""
    padded = torch.cat([values, values.new_zeros(1)])
    return torch.where(lengths > 0, padded[_offsets(lengths)[:-1]], torch.zeros_like(lengths))


def model_inputs(spec, batch: Batch) -> tuple:  # noqa: ANN001 - StudentModel or anything with its attributes
    """A Batch as the plain tensors the student runs on (`StudentModel.encode_tensors`):
    (values {feature: ids [N_f]}, lengths {feature: [B]}, dense [B, Fd], hist_ids {field: [B, n]} right-aligned,
    hist_mask [B, n] bool, summary [B, C] float). `spec` names the features, history fields, history length (n)
    and long-history summary (window, field, C): a StudentModel, or the ServingSpec of an exported one. With no
    history fields the history is {} and a [B, 0] mask; with no summary it is [B, 0]."""
    jts = batch.sparse.to_dict()
    values = {f: jts[f].values() for f in spec.features}
    lengths = {f: jts[f].lengths().to(torch.int64) for f in spec.features}
    if spec.hist_fields:
        hist_ids, mask = recent_padded(batch.history, spec.history_len, tuple(spec.hist_fields))
    else:
        hist_ids, mask = {}, torch.zeros(len(batch), 0, dtype=torch.bool, device=batch.dense.device)
    if spec.summary_len:
        h = batch.history
        summary = history_summary(h.fields[spec.summary_field], h.offsets, spec.summary_len, spec.summary_cats)
    else:
        summary = torch.zeros(len(batch), 0, device=batch.dense.device)
    return values, lengths, batch.dense, hist_ids, mask, summary


def serving_inputs(spec, batch: Batch) -> tuple:  # noqa: ANN001 - see model_inputs
    """A Batch as the arguments of `ServedStudent`: `model_inputs` plus traffic [B] (for the sampling correction)."""
    return (*model_inputs(spec, batch), batch.traffic)


class ServedStudent(nn.Module):
    """What is served: the backbone and the main tower alone, on plain tensors (see `serving_inputs`), returning
    [B, num_tasks] true-space predictions, mapped as recdistill/distill/debias.py `true_space` maps them:
    sigmoid(z + correction[traffic]) for the sampling task (the student's own sampling correction g, DESIGN §4),
    the within factor for tasks within it, expm1 for continuous tasks trained with log-MSE. The auxiliary tower is
    not part of it. It runs the model's own `encode_tensors` and tower on the trained parameters (shared storage),
    so serving and training share one code path."""

    def __init__(self, model: StudentModel, correction: torch.Tensor, kinds: dict[str, str],
                 continuous: str = "log_mse", *, sampling_task: str = "ctr", within: dict[str, str] | None = None,
                 b: float = 0.0) -> None:
        super().__init__()
        self.model = model.without_aux()
        self.register_buffer("correction", correction.float().clone())  # [num_traffic]
        # r / q_eff per traffic, for the tasks within the sampling task (recdistill/distill/debias.py)
        self.register_buffer("r_over_q", torch.exp(correction.float() - b))
        self.binary = [kinds[t] == "binary" for t in model.tasks]
        self.log_space = continuous == "log_mse"
        self.by = sampling_task if sampling_task in model.tasks and kinds[sampling_task] == "binary" else None
        self.within = [self.by is not None and (within or {}).get(t) == self.by for t in model.tasks]

    def forward(self, values: dict[str, torch.Tensor], lengths: dict[str, torch.Tensor], dense: torch.Tensor,
                hist_ids: dict[str, torch.Tensor], hist_mask: torch.Tensor, summary: torch.Tensor,
                traffic: torch.Tensor) -> torch.Tensor:
        m = self.model
        z = m._run_tower(m.main, m.encode_tensors(values, lengths, dense, hist_ids, hist_mask, summary))
        c = self.correction[traffic]
        p_by = torch.sigmoid(z[self.by] + c) if self.by is not None else None
        cols = []
        for t, is_binary, within in zip(m.tasks, self.binary, self.within, strict=True):
            if t == self.by:
                cols.append(p_by)
                continue
            v = torch.sigmoid(z[t]) if is_binary else z[t]
            if within:  # same mapping as debias.true_space
                v = v * (p_by + (1.0 - p_by) * self.r_over_q[traffic])
            cols.append(v if is_binary or not self.log_space else torch.expm1(v))
        return torch.stack(cols, dim=1)
