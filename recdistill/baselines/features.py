"""Engineered features of the simple baselines, built from the Schema and the resolved Roles alone.

    rows = collect_rows(source, days, view, roles, history_len)        # the columns the features need, chunked
    feats = build_features(train, evals, schema, roles, task="ctr")     # (X_train, X_eval, names)

What a row gets (nothing here knows which features interact in a given world):

* **history / candidate match**: `target_match` of the candidate category against the events' categories (share and
  log-count over the last 8, 64 and all visible events, log history length), and the same for the candidate item
  against the events' items, where the roles exist;
* **out-of-fold target encodings** (one per binary task) of every single-valued sparse feature and of crosses:
  every pair and triple of single-valued features with at most `cross_limit` ids, and each of those with the user
  and with the item. A training row's encoding comes from the rows of the other K folds (folds by a hash of
  sample_id), so its own label never enters it; evaluation rows get encodings from all training rows. Each is
  smoothed toward the prior with a pseudo-count and given as a logit; a multi-valued feature (several ids per row)
  is crossed with nothing and encoded as the mean of its ids' out-of-fold encodings;
* log frequency of the user and of the item in the training rows;
* dense features (standardised by the model) and a one-hot of the traffic source.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from recdistill.config import SamplingConfig
from recdistill.data.batch import Batch, Roles, Schema, first_ids
from recdistill.data.source import DataSource, read_view
from recdistill.hashing import hash_uniform
from recdistill.models.match import target_match
from recdistill.tracking import progress

#: Salt of the fold assignment (independent of the sampling hash of the same sample ids).
FOLD_SALT = 0xF01D_BA5E
#: Rows read per call to the source: bounds the memory the histories take while their statistics are computed.
CHUNK_ROWS = 8192


@dataclass
class Rows:
    """What the features need of a set of rows, histories already reduced to their match statistics.

    sparse: feature -> [n] int64 id (-1 where the row has no id; the first id of a multi-valued row); multi: the
    sparse features that had a row with other than one id (crossed with nothing; encoded as the mean of their ids'
    encodings from `bags`: feature -> (lengths [n], values))."""

    sample_id: np.ndarray
    traffic: np.ndarray
    labels: dict[str, np.ndarray]
    dense: np.ndarray
    sparse: dict[str, np.ndarray]
    match: np.ndarray
    match_names: list[str]
    p_true: dict[str, np.ndarray] = field(default_factory=dict)
    multi: set[str] = field(default_factory=set)
    bags: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sample_id)


def _match(batch: Batch, roles: Roles, history_len: int) -> tuple[np.ndarray, list[str]]:
    """[B, M] match statistics of the candidate category and item against the last `history_len` events."""
    lengths = batch.history.lengths
    hist = batch.history.last(history_len) if lengths.numel() and int(lengths.max()) > history_len else batch.history
    cols, names = [], []
    for role, hrole, tag in (("category", "hist_category", "cat"), ("item", "hist_item", "item")):
        feat, hfield = getattr(roles, role), getattr(roles, hrole)
        if feat is None or hfield is None:
            continue
        jt = batch.sparse[feat]
        cand = first_ids(jt.values(), jt.lengths()).numpy()
        m = target_match(torch.from_numpy(cand), hist.fields[hfield], hist.offsets).numpy()
        if names:  # the last column (log history length) is the same for every pair: once is enough
            m = m[:, :-1]
        cols.append(m)
        names += [f"match_{tag}_{s}" for s in ("share8", "log8", "share64", "log64", "share_all", "log_all")]
        if len(names) == 6:
            names.append("log_history_len")
    if not cols:  # no role to match by: the history length alone
        lengths = hist.lengths.numpy().astype(np.float32)
        return np.log1p(lengths)[:, None], ["log_history_len"]
    return np.concatenate(cols, 1).astype(np.float32), names


def collect_rows(source: DataSource, days: list[int], view: SamplingConfig | None, roles: Roles, history_len: int,
                 *, desc: str = "rows", show_progress: bool = True) -> Rows:
    """The rows of `days` kept by `view` (None: every row), read in chunks of CHUNK_ROWS with the view pushed down,
    each chunk's history reduced to match statistics before the next is read."""
    binary = [t.name for t in source.schema.tasks if t.kind == "binary"]
    chunks = [(d, s, min(s + CHUNK_ROWS, source.num_rows(d))) for d in days
              for s in range(0, source.num_rows(d), CHUNK_ROWS)]
    parts: dict[str, list] = {}
    multi: set[str] = set()
    names: list[str] = []
    for day, start, stop in progress(chunks, desc=desc, enabled=show_progress, unit="chunk"):
        b = read_view(source, day, start, stop, view)
        if not len(b):
            continue
        m, names = _match(b, roles, history_len)
        got = {"sample_id": b.sample_id.numpy(), "traffic": b.traffic.numpy().astype(np.int64),
               "dense": b.dense.numpy(), "match": m,
               **{f"label/{t}": b.labels[t].numpy() for t in binary},
               **{f"p_true/{t}": b.p_true[t].numpy() for t in binary if b.p_true and t in b.p_true}}
        for k in source.schema.sparse:
            jt = b.sparse[k]
            if bool((jt.lengths() != 1).any()):
                multi.add(k)
            got[f"sparse/{k}"] = first_ids(jt.values(), jt.lengths()).numpy()
            got[f"bag_len/{k}"], got[f"bag_val/{k}"] = jt.lengths().numpy(), jt.values().numpy()
        for k, v in got.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        raise ValueError(f"no rows in days {days} under view {getattr(view, 'name', None)!r}")
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    pick = lambda prefix: {k[len(prefix):]: v for k, v in cat.items() if k.startswith(prefix)}  # noqa: E731
    return Rows(sample_id=cat["sample_id"], traffic=cat["traffic"], labels=pick("label/"), dense=cat["dense"],
                sparse=pick("sparse/"), match=cat["match"], match_names=names, p_true=pick("p_true/"), multi=multi,
                bags={k: (cat[f"bag_len/{k}"], cat[f"bag_val/{k}"]) for k in multi})


def folds_of(sample_id: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Fold (0..folds-1) of each row, a hash of its sample id."""
    return np.minimum((hash_uniform(sample_id, seed, FOLD_SALT) * folds).astype(np.int64), folds - 1)


def cross_groups(schema: Schema, roles: Roles, multi: set[str], cross_limit: int, max_order: int = 3
                 ) -> list[tuple[str, ...]]:
    """The feature groups to target-encode: each single-valued sparse feature, every pair and (max_order 3) triple
    of single-valued features with at most `cross_limit` ids, and each of those with the user and with the item."""
    single = [k for k in schema.sparse if k not in multi]
    big = [r for r in (roles.user, roles.item) if r is not None and r in single]
    low = [k for k in single if schema.sparse[k] <= cross_limit and k not in big]
    groups: list[tuple[str, ...]] = [(k,) for k in single]
    for order in range(2, max_order + 1):
        groups += list(itertools.combinations(low, order))
    groups += [(k, b) for b in big for k in low]
    return groups


def group_codes(train: Rows, evals: Rows, group: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, int]:
    """(train codes, eval codes, number of codes): one dense code per distinct combination of the group's ids over
    the training and evaluation rows together."""
    ids = [np.concatenate([train.sparse[k], evals.sparse[k]]) + 1 for k in group]  # -1 (no id) becomes 0
    key = ids[0]
    for nxt in ids[1:]:
        span = int(nxt.max(initial=0)) + 1
        if int(key.max(initial=0)) >= (2**62) // span:  # would overflow: renumber the combinations so far first
            key = np.unique(key, return_inverse=True)[1].astype(np.int64)
        key = key * span + nxt
    uniq, inv = np.unique(key, return_inverse=True)
    inv = inv.astype(np.int64).reshape(-1)
    return inv[:len(train)], inv[len(train):], len(uniq)


def target_encode(codes_train: np.ndarray, y: np.ndarray, fold: np.ndarray, codes_eval: np.ndarray, n_codes: int,
                  folds: int, prior_weight: float, prior: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed mean label per code: (encoding of each training row from the other folds' rows, encoding of each
    evaluation row from all training rows), each (sum of labels + prior_weight * prior) / (rows + prior_weight)
    with the prior the training rows' mean label (or `prior`). A code no other row shares gets the prior."""
    y = y.astype(np.float64)
    s_all = np.bincount(codes_train, weights=y, minlength=n_codes)
    n_all = np.bincount(codes_train, minlength=n_codes).astype(np.float64)
    flat = fold * n_codes + codes_train
    s_fold = np.bincount(flat, weights=y, minlength=folds * n_codes).reshape(folds, n_codes)
    n_fold = np.bincount(flat, minlength=folds * n_codes).reshape(folds, n_codes).astype(np.float64)
    # One global prior for every row: a per-fold prior (the other folds' mean) would differ between folds in
    # the direction opposite to each fold's own mean label, a small leak that a model can pick up.
    prior = y.mean() if prior is None else prior
    s = s_all[codes_train] - s_fold[fold, codes_train]
    n = n_all[codes_train] - n_fold[fold, codes_train]
    enc_train = (s + prior_weight * prior) / (n + prior_weight)
    enc_eval = (s_all[codes_eval] + prior_weight * prior) / (n_all[codes_eval] + prior_weight)
    return enc_train, enc_eval


def bag_encode(train_bag: tuple[np.ndarray, np.ndarray], y: np.ndarray, fold: np.ndarray,
               eval_bag: tuple[np.ndarray, np.ndarray], folds: int, prior_weight: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold encoding of a multi-valued feature: each (row, id) pair is encoded as in :func:`target_encode`
    (the row's label counted once per id), and a row gets the mean of its ids' encodings (the prior with none)."""
    (len_tr, val_tr), (len_ev, val_ev) = train_bag, eval_bag
    row_tr = np.repeat(np.arange(len(len_tr)), len_tr)
    row_ev = np.repeat(np.arange(len(len_ev)), len_ev)
    _, inv = np.unique(np.concatenate([val_tr, val_ev]), return_inverse=True)
    inv = inv.astype(np.int64).reshape(-1)
    prior = float(y.mean())  # of rows, not of (row, id) pairs: rows with many ids would weigh more
    enc_tr, enc_ev = target_encode(inv[:len(val_tr)], y[row_tr], fold[row_tr], inv[len(val_tr):],
                                   int(inv.max(initial=-1)) + 1, folds, prior_weight, prior)

    def mean(enc: np.ndarray, row: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        total = np.bincount(row, weights=enc, minlength=len(lengths))
        return np.where(lengths > 0, total / np.maximum(lengths, 1), prior)

    return mean(enc_tr, row_tr, len_tr), mean(enc_ev, row_ev, len_ev)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


@dataclass
class Features:
    """Feature matrices of one binary task: training rows, evaluation rows, column names."""

    train: np.ndarray
    eval: np.ndarray
    names: list[str]


class FeatureBuilder:
    """Builds the baseline features of `train` and `evals` (module docstring). The group codes and the label-free
    columns are computed once; :meth:`for_task` adds the target encodings of one binary task."""

    def __init__(self, train: Rows, evals: Rows, schema: Schema, roles: Roles, *, folds: int = 5,
                 cross_limit: int = 100, max_order: int = 3, prior_weight: float = 20.0, seed: int = 0) -> None:
        if folds < 2:
            raise ValueError(f"folds={folds}: out-of-fold encodings need at least 2 folds")
        self.train, self.evals, self.folds, self.prior_weight = train, evals, folds, prior_weight
        self.fold = folds_of(train.sample_id, folds, seed)
        multi = train.multi | evals.multi
        self.bags = [k for k in schema.sparse if k in multi and k in train.bags and k in evals.bags]
        self.groups = cross_groups(schema, roles, multi, cross_limit, max_order)
        self.codes = {g: group_codes(train, evals, g) for g in self.groups}
        self.shared_train, self.shared_eval, self.shared_names = self._shared(schema, roles, multi)

    def _shared(self, schema: Schema, roles: Roles, multi: set[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Label-free columns: match statistics, log frequencies of user and item, dense, traffic one-hot."""
        tr, ev = [self.train.match], [self.evals.match]
        names = list(self.train.match_names)
        for role in ("user", "item"):
            k = getattr(roles, role)
            if k is None or k in multi:
                continue
            ct, ce, n = self.codes[(k,)]
            counts = np.bincount(ct, minlength=n).astype(np.float64)
            tr.append(np.log1p(counts[ct])[:, None])
            ev.append(np.log1p(counts[ce])[:, None])
            names.append(f"log_count_{role}")
        tr.append(self.train.dense)
        ev.append(self.evals.dense)
        names += [f"dense_{d}" for d in schema.dense]
        if schema.num_traffic > 1:
            eye = np.eye(schema.num_traffic, dtype=np.float32)
            tr.append(eye[self.train.traffic])
            ev.append(eye[self.evals.traffic])
            names += [f"traffic_{i}" for i in range(schema.num_traffic)]
        return (np.concatenate([a.astype(np.float64) for a in tr], 1),
                np.concatenate([a.astype(np.float64) for a in ev], 1), names)

    def for_task(self, task: str) -> Features:
        """The features of binary task `task`: the shared columns and one target encoding per group."""
        y = self.train.labels[task]
        enc_tr, enc_ev = [], []
        for g in self.groups:
            ct, ce, n = self.codes[g]
            a, b = target_encode(ct, y, self.fold, ce, n, self.folds, self.prior_weight)
            enc_tr.append(_logit(a))
            enc_ev.append(_logit(b))
        for k in self.bags:
            a, b = bag_encode(self.train.bags[k], y, self.fold, self.evals.bags[k], self.folds, self.prior_weight)
            enc_tr.append(_logit(a))
            enc_ev.append(_logit(b))
        names = (self.shared_names + [f"te_{task}_{'x'.join(g)}" for g in self.groups]
                 + [f"te_{task}_{k}_mean" for k in self.bags])
        return Features(np.concatenate([self.shared_train, np.stack(enc_tr, 1)], 1),
                        np.concatenate([self.shared_eval, np.stack(enc_ev, 1)], 1), names)
