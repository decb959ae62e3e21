"""MovieLens-100k, the real dataset, read from the copy bundled in the `recbole==1.2.1` wheel (no network).

* label: `ctr` = rating >= 4 (binary); `rating` (continuous) = the rating itself.
* days: the 100,000 interactions sorted by time and cut into `data.num_days` equal-count buckets (the raw
  timeline is very uneven: most ratings fall in a few weeks), so "day" d is the d-th time bucket and the last
  `data.eval_days` buckets are the held-out evaluation days.
* history: the user's interactions strictly earlier in time (ties excluded), oldest first, at most
  `data.history_len` of them: hist_item, hist_cat (first genre), hist_action (rating), hist_ts.
* sparse: user_id, item_id, item_cat, age (bucket), gender, occupation, release_year (bucket); one traffic source.
* sample_id = day << 40 | index of the interaction within its day (time order). No ground truth (p_true).
`data.tasks` describes the synthetic world's tasks and is not used here.
"""

from __future__ import annotations

import importlib.resources

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recdistill.data.batch import Batch, History, Schema, TaskSpec, offsets_from_lengths

SPARSE = ("user_id", "item_id", "item_cat", "age", "gender", "occupation", "release_year")
AGE_BUCKETS = np.array([18, 25, 35, 45, 50, 56])  # the usual MovieLens age groups


def _read_tsv(name: str) -> tuple[list[str], list[list[str]]]:
    path = importlib.resources.files("recbole") / "dataset_example" / "ml-100k" / name
    lines = path.read_text(encoding="latin-1").splitlines()
    header = [h.split(":")[0] for h in lines[0].split("\t")]
    return header, [ln.split("\t") for ln in lines[1:] if ln]


def _codes(values: list[str]) -> np.ndarray:
    """Dense integer codes (1-based; 0 is 'unknown') in sorted order of the distinct values."""
    uniq = sorted(set(values))
    index = {v: i + 1 for i, v in enumerate(uniq)}
    return np.array([index[v] for v in values], dtype=np.int64)


class MovieLensSource:
    """DataSource over MovieLens-100k (see module docstring)."""

    sampling = None

    def __init__(self, data_cfg) -> None:  # noqa: ANN001 - DataConfig
        self.history_len = data_cfg.history_len
        _, inter = _read_tsv("ml-100k.inter")
        raw = np.array([[int(r[0]), int(r[1]), float(r[2]), float(r[3])] for r in inter])
        self.user, self.item = raw[:, 0].astype(np.int64), raw[:, 1].astype(np.int64)
        self.rating, self.ts = raw[:, 2].astype(np.float32), raw[:, 3].astype(np.int64)
        self.n = len(raw)
        # side features, indexed by id (0 = unknown)
        _, users = _read_tsv("ml-100k.user")
        uid = np.array([int(r[0]) for r in users])
        self.user_feats = {k: np.zeros(uid.max() + 1, dtype=np.int64) for k in ("age", "gender", "occupation")}
        self.user_feats["age"][uid] = np.searchsorted(AGE_BUCKETS, [int(r[1]) for r in users], side="right") + 1
        self.user_feats["gender"][uid] = _codes([r[2] for r in users])
        self.user_feats["occupation"][uid] = _codes([r[3] for r in users])
        _, items = _read_tsv("ml-100k.item")
        iid = np.array([int(r[0]) for r in items])
        genre = [(r[3].split(" ")[0] if len(r) > 3 and r[3] else "") for r in items]
        year = [(r[2] if len(r) > 2 else "") for r in items]
        self.item_cat = np.zeros(iid.max() + 1, dtype=np.int64)
        self.item_cat[iid] = _codes(genre)
        decade = np.array([(int(y) // 10) if y.isdigit() else 0 for y in year])
        self.item_year = np.zeros(iid.max() + 1, dtype=np.int64)
        self.item_year[iid] = np.where(decade > 0, decade - decade[decade > 0].min() + 1, 0)
        # time order, equal-count day buckets
        order = np.lexsort((self.item, self.user, self.ts))
        self.order = order
        self.num_days = data_cfg.num_days
        self.day_of = np.empty(self.n, dtype=np.int64)
        self.day_of[order] = np.arange(self.n) * self.num_days // self.n
        self.day_start = np.searchsorted(self.day_of[order], np.arange(self.num_days + 1))
        # per-user histories: rows sorted by (user, ts); a row's history is its user's rows with a smaller ts
        by_user = np.lexsort((self.item, self.ts, self.user))
        self.by_user = by_user
        u_sorted, t_sorted = self.user[by_user], self.ts[by_user]
        user_start = np.searchsorted(u_sorted, u_sorted, side="left")
        key = u_sorted * (1 << 32) + t_sorted
        first_same = np.searchsorted(key, key, side="left")  # first row of this (user, ts): ties excluded
        self.hist_end = np.empty(self.n, dtype=np.int64)
        self.hist_start = np.empty(self.n, dtype=np.int64)
        self.hist_end[by_user] = first_same
        self.hist_start[by_user] = user_start
        self.schema = Schema(
            tasks=(TaskSpec("ctr", "binary"), TaskSpec("rating", "continuous")), dense=(),
            sparse={"user_id": int(self.user.max()) + 1, "item_id": int(self.item.max()) + 1,
                    "item_cat": int(self.item_cat.max()) + 1, "age": len(AGE_BUCKETS) + 2,
                    "gender": int(self.user_feats["gender"].max()) + 1,
                    "occupation": int(self.user_feats["occupation"].max()) + 1,
                    "release_year": int(self.item_year.max()) + 1},
            history={"item": int(self.item.max()) + 1, "cat": int(self.item_cat.max()) + 1, "action": 6,
                     "ts": int(self.ts.max()) + 1},
            num_traffic=1, max_history=self.history_len)

    def days(self) -> list[int]:
        return list(range(self.num_days))

    def num_rows(self, day: int) -> int:
        return int(self.day_start[day + 1] - self.day_start[day])

    def read(self, day: int, start: int, stop: int) -> Batch:
        """Interactions [start, stop) of time bucket `day`, in time order."""
        if not (0 <= day < self.num_days) or not (0 <= start <= stop <= self.num_rows(day)):
            raise ValueError(f"movielens: rows [{start}, {stop}) of day {day} do not exist")
        rows = self.order[self.day_start[day] + start : self.day_start[day] + stop]
        n = len(rows)
        end = self.hist_end[rows]
        begin = np.maximum(self.hist_start[rows], end - self.history_len)
        lengths = end - begin
        pos = np.repeat(begin - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        ev = self.by_user[pos]
        user, item = self.user[rows], self.item[rows]
        feats = {"user_id": user, "item_id": item, "item_cat": self.item_cat[item],
                 "age": self.user_feats["age"][user], "gender": self.user_feats["gender"][user],
                 "occupation": self.user_feats["occupation"][user], "release_year": self.item_year[item]}
        t = torch.from_numpy
        return Batch(
            sample_id=t((np.int64(day) << np.int64(40)) | np.arange(start, stop, dtype=np.int64)),
            day=torch.full((n,), day, dtype=torch.int32), traffic=torch.zeros(n, dtype=torch.int64),
            labels={"ctr": t((self.rating[rows] >= 4).astype(np.float32)), "rating": t(self.rating[rows].copy())},
            dense=torch.zeros(n, 0),
            sparse=KeyedJaggedTensor(keys=list(SPARSE), values=t(np.concatenate([feats[k] for k in SPARSE])),
                                     lengths=torch.ones(n * len(SPARSE), dtype=torch.int64), stride=n),
            history=History(offsets_from_lengths(t(lengths)),
                            {"item": t(self.item[ev]), "cat": t(self.item_cat[self.item[ev]]),
                             "action": t(self.rating[ev].astype(np.int64)), "ts": t(self.ts[ev])}),
        )
