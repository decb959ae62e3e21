"""MovieLens-100k, the real dataset, read from the copy bundled in the `recbole==1.2.1` wheel (no network).

    recdistill demo --set data.source=movielens --set data.num_days=6 --set data.history_len=200

* tasks: `ctr` = rating >= 4 (binary) and `rating` = the rating itself (continuous). By default both; an explicit
  `data.tasks` picks among them (same order), and any other name or kind is refused.
* days: the 100,000 ratings sorted by time and cut into `data.num_days` buckets of about equal count (the raw
  timeline is very uneven: half of the ratings fall in a few of its 30 weeks), each cut moved forward to the
  next new timestamp so ratings of the same second share a bucket. Bucket d is "day" d; every rating of a day
  is later than every rating of an earlier day, and the last `data.eval_days` buckets are the held-out
  evaluation days (the trainers take `days()[-eval_days:]`).
* history: the user's ratings strictly earlier in time (same-second ratings excluded), oldest first, at most
  `data.history_len` of them: hist_item, hist_cat (the movie's first genre), hist_action (the rating, 1-5),
  hist_ts (unix seconds).
* sparse: user_id, item_id, item_cat (first genre), genres (every genre of the movie: several ids), age (the
  usual seven MovieLens age groups), gender, occupation, release_year (decade); one traffic source; no dense.
* sample_id = day << 40 | index of the rating within its day (time order, then user, then item). No ground truth.
"""

from __future__ import annotations

import importlib.resources

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recdistill.config import DataConfig, SamplingConfig
from recdistill.data.batch import Batch, History, Roles, Schema, TaskSpec, offsets_from_lengths
from recdistill.data.sampling import keep_mask

TASKS = {"ctr": "binary", "rating": "continuous"}
SPARSE = ("user_id", "item_id", "item_cat", "genres", "age", "gender", "occupation", "release_year")
AGE_BUCKETS = np.array([18, 25, 35, 45, 50, 56])  # the usual MovieLens age groups (<18, 18-24, ..., 56+)


def _read_tsv(name: str) -> list[list[str]]:
    """Rows of one of the bundled atomic files (tab-separated, a typed header line)."""
    path = importlib.resources.files("recbole") / "dataset_example" / "ml-100k" / name
    lines = path.read_text(encoding="latin-1").splitlines()
    return [ln.split("\t") for ln in lines[1:] if ln]


def _codes(values: list[str]) -> np.ndarray:
    """Dense integer codes (1-based; 0 is 'unknown') in sorted order of the distinct values."""
    index = {v: i + 1 for i, v in enumerate(sorted(set(values)))}
    return np.array([index[v] for v in values], dtype=np.int64)


def _tasks(data_cfg: DataConfig) -> tuple[TaskSpec, ...]:
    if "tasks" not in data_cfg.model_fields_set:  # the default list describes the synthetic world
        return tuple(TaskSpec(n, k) for n, k in TASKS.items())
    bad = [f"{t.name} ({t.kind})" for t in data_cfg.tasks if TASKS.get(t.name) != t.kind]
    if bad:
        raise ValueError(f"data.tasks: MovieLens-100k has no task {bad}; it has ctr (binary: rating >= 4) and "
                         "rating (continuous)")
    return tuple(TaskSpec(t.name, t.kind) for t in data_cfg.tasks)


class MovieLensSource:
    """DataSource over MovieLens-100k (see the module docstring)."""

    sampling = None  # every rating, unsampled
    list_sparse = ("genres",)  # several ids per row: exported as list<int64> even if a first chunk has one each
    #: Feature roles: the category is the movie's first genre (item_cat, hist_cat), the action its rating.
    roles = Roles(user="user_id", item="item_id", category="item_cat", hist_item="item", hist_category="cat",
                  hist_action="action")

    def __init__(self, data_cfg: DataConfig) -> None:
        self.history_len, self.num_days = data_cfg.history_len, data_cfg.num_days
        self.tasks = _tasks(data_cfg)
        raw = np.array([[int(x) for x in r[:4]] for r in _read_tsv("ml-100k.inter")], dtype=np.int64)
        self.user, self.item, self.ts = raw[:, 0], raw[:, 1], raw[:, 3]
        self.rating = raw[:, 2].astype(np.float32)
        self.n = len(raw)
        self._side_features()
        # time order (ties broken by user, item) and day buckets
        self.order = np.lexsort((self.item, self.user, self.ts))
        ts_sorted = self.ts[self.order]
        target = np.arange(1, self.num_days) * self.n // self.num_days
        cuts = np.searchsorted(ts_sorted, ts_sorted[target], side="left")  # same-second ratings stay together
        self.day_start = np.r_[0, cuts, self.n]
        if np.any(np.diff(self.day_start) <= 0):
            raise ValueError(f"data.num_days={self.num_days}: too many buckets for MovieLens-100k's timestamps "
                             "(a bucket would be empty)")
        # per-user histories: rows sorted by (user, ts); a row's history is its user's rows with a smaller ts
        self.by_user = np.lexsort((self.item, self.ts, self.user))
        u_sorted, t_sorted = self.user[self.by_user], self.ts[self.by_user]
        key = u_sorted * (1 << 32) + t_sorted
        self.hist_start = np.empty(self.n, dtype=np.int64)
        self.hist_end = np.empty(self.n, dtype=np.int64)
        self.hist_start[self.by_user] = np.searchsorted(u_sorted, u_sorted, side="left")
        self.hist_end[self.by_user] = np.searchsorted(key, key, side="left")  # first row of this (user, ts)
        self.schema = Schema(
            tasks=self.tasks, dense=(),
            sparse={"user_id": int(self.user.max()) + 1, "item_id": int(self.item.max()) + 1,
                    "item_cat": self.num_genres + 1, "genres": self.num_genres + 1, "age": len(AGE_BUCKETS) + 2,
                    "gender": int(self.user_feats["gender"].max()) + 1,
                    "occupation": int(self.user_feats["occupation"].max()) + 1,
                    "release_year": int(self.item_year.max()) + 1},
            history={"item": int(self.item.max()) + 1, "cat": self.num_genres + 1, "action": 6,
                     "ts": int(self.ts.max()) + 1},
            num_traffic=1, max_history=self.history_len)

    def _side_features(self) -> None:
        """User (age group, gender, occupation) and item (genres, release decade) features, indexed by id."""
        users = _read_tsv("ml-100k.user")
        uid = np.array([int(r[0]) for r in users])
        self.user_feats = {k: np.zeros(uid.max() + 1, dtype=np.int64) for k in ("age", "gender", "occupation")}
        self.user_feats["age"][uid] = np.searchsorted(AGE_BUCKETS, [int(r[1]) for r in users], side="right") + 1
        self.user_feats["gender"][uid] = _codes([r[2] for r in users])
        self.user_feats["occupation"][uid] = _codes([r[3] for r in users])
        items = _read_tsv("ml-100k.item")
        iid = np.array([int(r[0]) for r in items])
        genre_lists = [(r[3].split() if len(r) > 3 else []) for r in items]
        names = sorted({g for gs in genre_lists for g in gs})
        code = {g: i + 1 for i, g in enumerate(names)}  # 0: no genre
        self.num_genres = len(names)
        lengths = np.ones(iid.max() + 1, dtype=np.int64)  # one id (0: unknown) for movies without a genre
        lengths[iid] = [max(len(gs), 1) for gs in genre_lists]
        self.genre_offsets = offsets_from_lengths(torch.from_numpy(lengths)).numpy()
        self.genre_values = np.zeros(self.genre_offsets[-1], dtype=np.int64)
        for i, gs in zip(iid, genre_lists, strict=True):  # once per movie at load time, not per sample
            self.genre_values[self.genre_offsets[i] : self.genre_offsets[i] + len(gs)] = [code[g] for g in gs]
        self.item_cat = self.genre_values[self.genre_offsets[:-1]]  # first genre (0 for unknown ids)
        decade = np.array([int(r[2]) // 10 if len(r) > 2 and r[2].isdigit() else 0 for r in items])
        self.item_year = np.zeros(iid.max() + 1, dtype=np.int64)
        self.item_year[iid] = np.where(decade > 0, decade - decade[decade > 0].min() + 1, 0)

    def days(self) -> list[int]:
        return list(range(self.num_days))

    def num_rows(self, day: int) -> int:
        return int(self.day_start[day + 1] - self.day_start[day])

    def read(self, day: int, start: int, stop: int, view: SamplingConfig | None = None) -> Batch:
        """Ratings [start, stop) of time bucket `day`, in time order; with `view`, those it keeps (decided from
        sample id and rating before any history is gathered)."""
        if not (0 <= day < self.num_days) or not (0 <= start <= stop <= self.num_rows(day)):
            raise ValueError(f"movielens: rows [{start}, {stop}) of day {day} do not exist")
        idx = np.arange(start, stop, dtype=np.int64)
        rows = self.order[self.day_start[day] + idx]
        if view is not None:
            positive = self._labels(rows)[view.task] > 0.5
            keep = keep_mask((np.int64(day) << np.int64(40)) | idx, positive, np.zeros(len(rows), dtype=np.int64),
                             view, 1)
            idx, rows = idx[keep], rows[keep]
        return self._batch(day, idx, rows, view)

    def _labels(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {"ctr": (self.rating[rows] >= 4).astype(np.float32), "rating": self.rating[rows].copy()}

    def _batch(self, day: int, idx: np.ndarray, rows: np.ndarray, view: SamplingConfig | None) -> Batch:
        """Ratings `rows` (indices into the raw arrays), which are rows `idx` of `day`, as a Batch."""
        n = len(rows)
        end = self.hist_end[rows]
        begin = np.maximum(self.hist_start[rows], end - self.history_len)  # the most recent history_len events
        ev = self.by_user[_ranges(begin, end)]
        user, item = self.user[rows], self.item[rows]
        g_len = self.genre_offsets[item + 1] - self.genre_offsets[item]
        genres = self.genre_values[_ranges(self.genre_offsets[item], self.genre_offsets[item + 1])]
        single = {"user_id": user, "item_id": item, "item_cat": self.item_cat[item],
                  "age": self.user_feats["age"][user], "gender": self.user_feats["gender"][user],
                  "occupation": self.user_feats["occupation"][user], "release_year": self.item_year[item]}
        ones = np.ones(n, dtype=np.int64)
        t = torch.from_numpy
        labels = self._labels(rows)
        return Batch(
            sample_id=t((np.int64(day) << np.int64(40)) | idx),
            day=torch.full((n,), day, dtype=torch.int32), traffic=torch.zeros(n, dtype=torch.int64),
            labels={x.name: t(labels[x.name]) for x in self.tasks},
            dense=torch.zeros(n, 0),
            sparse=KeyedJaggedTensor(
                keys=list(SPARSE), stride=n,
                values=t(np.concatenate([genres if k == "genres" else single[k] for k in SPARSE])),
                lengths=t(np.concatenate([g_len if k == "genres" else ones for k in SPARSE]))),
            history=History(offsets_from_lengths(t(end - begin)),
                            {"item": t(self.item[ev]), "cat": t(self.item_cat[self.item[ev]]),
                             "action": t(self.rating[ev].astype(np.int64)), "ts": t(self.ts[ev])}),
            sampling=view,
        )


def _ranges(begin: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Concatenation of arange(begin[i], end[i]) over i, vectorised."""
    lengths = end - begin
    return np.repeat(begin - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
