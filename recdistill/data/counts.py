"""Counting features: how often each user was shown each value of a categorical feature on the days before a row's day.

    src = build_source(cfg.data)        # with data.counts: true, a CountedSource around the configured source

A ranking log carries evidence that no single row shows: a retrieval stage picks a user's candidates partly from what
it believes the user likes, so how often a user has been *shown* each category (impressions, clicked or not) says
something about the user's interests, and impressions are known for every row, sampled or not. Production rankers
serve such counters from a feature store; here they are dense columns appended to every row, the same for every
model (teacher, students, baselines), so the comparison between them stays fair.

Counted groups, chosen from the schema and the data alone (nothing knows which features matter in a given world):
the user, the item, and the user crossed with every single-valued sparse feature of at most `COUNT_LIMIT` ids that is
not a function of the user (one value per user adds nothing to the user's own count). A row of day d gets
log(1 + count) of its group values over the stored rows of the days before d: causal, the same for any reader, worker
or view, and for the evaluation day it is what the training days showed. `data.count_window: N` counts the last N
days before d only; `data.count_scale: standard` shifts and scales each column to mean 0 and sd 1 over the stored rows.
With `data.count_cache: DIR` the tables are counted once and kept in DIR under a digest of the data config and of
the files under data.path; every later process loads them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys

import fsspec
import numpy as np
import torch

from recdistill.config import SamplingConfig
from recdistill.data.batch import Batch, Roles, Schema, first_ids
from recdistill.data.source import read_view
from recdistill.signals.writer import atomic_write
from recdistill.tracking import progress

#: A sparse feature with more ids than this is not crossed with the user (user x item is too sparse to count).
COUNT_LIMIT = 1000
#: Rows read per call while counting.
CHUNK_ROWS = 16384
#: Part of every cache key: bump it when what the tables hold changes, so older cache files are not read.
CACHE_VERSION = 1
#: DataConfig fields that change how rows are delivered, not which rows there are: left out of the cache key.
LOADER_ONLY = {"batch_size", "prefetch", "workers", "count_cache"}


def _first_ids(jt) -> np.ndarray:  # noqa: ANN001 - a JaggedTensor
    return first_ids(jt.values(), jt.lengths()).numpy()


def _keys(ids: list[np.ndarray], spans: list[int]) -> np.ndarray:
    """One int64 key per row of a group's ids (mixed radix; -1, no id, becomes 0)."""
    key = ids[0] + 1
    for v, span in zip(ids[1:], spans[1:], strict=True):
        key = key * (span + 1) + (v + 1)
    return key


@dataclasses.dataclass
class CountTables:
    """Per group: the sorted distinct keys seen, and [keys, days + 1] counts before each day (column j: days before
    the j-th of `days`; the last column counts every day). With a `window`, a row counts only the last `window` days
    before its own (the difference of two cumulative columns)."""

    days: list[int]
    groups: list[tuple[str, ...]]
    spans: dict[tuple[str, ...], list[int]]
    keys: dict[tuple[str, ...], np.ndarray]
    before: dict[tuple[str, ...], np.ndarray]
    #: per group, log(1 + count) -> (value - shift) / scale: 0 and 1 unless standardised
    shift: dict[tuple[str, ...], float] = dataclasses.field(default_factory=dict)
    scale: dict[tuple[str, ...], float] = dataclasses.field(default_factory=dict)
    window: int | None = None

    @property
    def names(self) -> list[str]:
        return [f"count_{'_x_'.join(g)}" for g in self.groups]

    def lookup(self, day: int, sparse: dict[str, np.ndarray]) -> np.ndarray:
        """[B, groups] log(1 + count) of each row's group values over the days before `day` (shifted and scaled
        when standardised)."""
        col = int(np.searchsorted(np.asarray(self.days), day))  # a day past the last: every day counted
        out = np.zeros((len(next(iter(sparse.values()))), len(self.groups)), np.float32)
        for j, g in enumerate(self.groups):
            key = _keys([sparse[k] for k in g], self.spans[g])
            keys = self.keys[g]
            pos = np.searchsorted(keys, key).clip(max=max(len(keys) - 1, 0))
            hit = keys[pos] == key if len(keys) else np.zeros(len(key), bool)
            v = np.where(hit, np.log1p(_windowed(self.before[g], pos, col, self.window)), 0.0)
            out[:, j] = (v - self.shift.get(g, 0.0)) / self.scale.get(g, 1.0)
        return out


def _windowed(before: np.ndarray, pos: np.ndarray, col: int, window: int | None) -> np.ndarray:
    """Counts of keys `pos` over the days before column `col`'s day, the last `window` of them only if given."""
    return before[pos, col] - before[pos, max(col - window, 0)] if window else before[pos, col]


def count_groups(schema: Schema, roles: Roles, multi: set[str]) -> list[tuple[str, ...]]:
    """The candidate groups: user, item, and user x each single-valued sparse feature of <= COUNT_LIMIT ids."""
    groups: list[tuple[str, ...]] = [(r,) for r in (roles.user, roles.item) if r is not None and r not in multi]
    if roles.user is not None and roles.user not in multi:
        groups += [(roles.user, k) for k, n in schema.sparse.items()
                   if k not in multi and k not in (roles.user, roles.item) and n <= COUNT_LIMIT]
    return groups


def _read_ids(source, day: int, start: int, stop: int) -> tuple[dict[str, np.ndarray], set[str]]:  # noqa: ANN001
    """(first id per row of each single-valued sparse feature, the multi-valued ones) of rows [start, stop): from the
    source's `sparse_ids` where it has one (no labels or history decoded), else from a full read."""
    if hasattr(source, "sparse_ids"):
        ids = source.sparse_ids(day, start, stop)
        return ids, set(source.schema.sparse) - set(ids)
    b = source.read(day, start, stop)
    multi = {k for k in source.schema.sparse if bool((b.sparse[k].lengths() != 1).any())}
    return {k: _first_ids(b.sparse[k]) for k in source.schema.sparse if k not in multi}, multi


def build_tables(source, roles: Roles, *, standardise: bool = False,  # noqa: ANN001 - DataSource
                 window: int | None = None, show_progress: bool = False) -> CountTables:
    """Count every stored row of every day of `source` (unsampled: impressions are known for every row). With
    `standardise`, each column is shifted and scaled to mean 0 and sd 1 over the stored rows of every day (label-free:
    an affine map per column, so that log counts of up to ~6 do not swamp dense features of unit scale)."""
    schema, days = source.schema, list(source.days())
    multi: set[str] = set()
    chunks = [(d, s, min(s + CHUNK_ROWS, source.num_rows(d))) for d in days for s in range(0, source.num_rows(d),
                                                                                          CHUNK_ROWS)]
    cols: dict[int, dict[str, list[np.ndarray]]] = {d: {} for d in days}
    for day, start, stop in progress(chunks, desc="counting", enabled=show_progress, unit="chunk"):
        ids, m = _read_ids(source, day, start, stop)
        multi |= m
        for k, v in ids.items():
            cols[day].setdefault(k, []).append(v)
    per_day = [{k: np.concatenate(v) for k, v in cols[d].items() if k not in multi} for d in days]
    groups = count_groups(schema, roles, multi)
    spans = {g: [schema.sparse[k] for k in g] for g in groups}
    n_users = len(np.unique(np.concatenate([rows[roles.user] for rows in per_day]))) \
        if any(len(g) == 2 for g in groups) else 0
    keys, before, kept, shift, scale = {}, {}, [], {}, {}
    for g in groups:
        day_keys = [_keys([rows[k] for k in g], spans[g]) for rows in per_day]
        uniq = np.unique(np.concatenate(day_keys))
        if len(g) == 2 and len(uniq) <= n_users:  # a function of the user: counts nothing the user's count does not
            continue
        at = [np.searchsorted(uniq, dk) for dk in day_keys]  # each row's key, per day
        counts = np.zeros((len(uniq), len(days) + 1), np.int32)
        for j, a in enumerate(at):
            counts[:, j + 1] = np.bincount(a, minlength=len(uniq))
        keys[g], before[g] = uniq, np.cumsum(counts, axis=1, dtype=np.int32)
        if standardise:  # each row's own value: the count of its key over the days before its day
            vals = np.concatenate([np.log1p(_windowed(before[g], a, j, window)) for j, a in enumerate(at)])
            shift[g], scale[g] = float(vals.mean()), float(max(vals.std(), 1e-6))
        kept.append(g)
    return CountTables(days=days, groups=kept, spans={g: spans[g] for g in kept}, keys=keys, before=before,
                       shift=shift, scale=scale, window=window)


def cache_path(data_cfg) -> str:  # noqa: ANN001 - DataConfig
    """`data.count_cache`/counts-<digest>.npz, the digest of what the tables depend on: the data config (less its
    loader-only fields; roles are resolved from it and the data) and every file under data.path with its size and
    modification time (a rewritten file is counted again)."""
    files = []
    if data_cfg.path:
        fs, root = fsspec.core.url_to_fs(str(data_cfg.path))
        found = fs.find(root, detail=True) if fs.isdir(root) else {root: fs.info(root)}
        files = sorted((name, info.get("size"), str(info.get("mtime") or info.get("LastModified") or
                                                    info.get("updated") or "")) for name, info in found.items())
    doc = {"version": CACHE_VERSION, "data": data_cfg.model_dump(mode="json", exclude=LOADER_ONLY), "files": files}
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]
    return f"{str(data_cfg.count_cache).rstrip('/')}/counts-{digest}.npz"


def save_tables(t: CountTables, fs, path: str) -> None:  # noqa: ANN001 - fsspec filesystem
    """Write the tables to `path` atomically (signals.writer.atomic_write: a reader never sees half a file)."""
    meta = {"version": CACHE_VERSION, "days": t.days, "groups": t.groups, "window": t.window,
            "spans": [t.spans[g] for g in t.groups], "shift": [t.shift.get(g) for g in t.groups],
            "scale": [t.scale.get(g) for g in t.groups]}
    arrays = {f"keys{j}": t.keys[g] for j, g in enumerate(t.groups)}
    arrays |= {f"before{j}": t.before[g] for j, g in enumerate(t.groups)}
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    atomic_write(fs, path, buf.getvalue())


def load_tables(fs, path: str) -> CountTables:  # noqa: ANN001 - fsspec filesystem
    """The tables `save_tables` wrote (ValueError if the file is not such a file, or of another CACHE_VERSION)."""
    with fs.open(path, "rb") as f:
        z = np.load(io.BytesIO(f.read()), allow_pickle=False)
    meta = json.loads(z["meta"].tobytes())
    if meta.get("version") != CACHE_VERSION:
        raise ValueError(f"cache version {meta.get('version')}, this code's is {CACHE_VERSION}")
    groups = [tuple(g) for g in meta["groups"]]
    return CountTables(days=meta["days"], groups=groups, spans=dict(zip(groups, meta["spans"], strict=True)),
                       keys={g: z[f"keys{j}"] for j, g in enumerate(groups)},
                       before={g: z[f"before{j}"] for j, g in enumerate(groups)},
                       shift={g: v for g, v in zip(groups, meta["shift"], strict=True) if v is not None},
                       scale={g: v for g, v in zip(groups, meta["scale"], strict=True) if v is not None},
                       window=meta["window"])


def cached_tables(inner, roles: Roles, cache: str, **kw) -> tuple[CountTables, str]:  # noqa: ANN001
    """(tables, where they came from): loaded from the file `cache` if it is there and readable, else counted and
    written there. A file that cannot be read is counted again and replaced, with a warning."""
    fs, path = fsspec.core.url_to_fs(cache)
    if fs.exists(path):
        try:
            return load_tables(fs, path), f"loaded from {path}"
        except Exception as e:  # noqa: BLE001 - any unreadable file: count again rather than fail the run
            print(f"data.count_cache: {path} is unreadable ({type(e).__name__}: {e}); counting again",
                  file=sys.stderr, flush=True)
    tables = build_tables(inner, roles, **kw)
    save_tables(tables, fs, path)
    return tables, f"counted, cached in {path}"


class CountedSource:
    """A data source whose rows carry the counting features (module docstring) as extra dense columns. Everything
    else is the wrapped source's."""

    def __init__(self, inner, roles: Roles, *, standardise: bool = False,  # noqa: ANN001 - DataSource
                 window: int | None = None, show_progress: bool = False, cache: str | None = None) -> None:
        """`cache`: a file (`cache_path`) to load the tables from, or to count them into when it is not there."""
        self.inner = inner
        kw = dict(standardise=standardise, window=window, show_progress=show_progress)
        if cache:
            self.tables, self.origin = cached_tables(inner, roles, cache, **kw)
        else:
            self.tables, self.origin = build_tables(inner, roles, **kw), "counted"
        self.schema = dataclasses.replace(inner.schema, dense=tuple(inner.schema.dense) + tuple(self.tables.names))

    def save_cache(self, cache: str) -> None:
        """Write these tables to the cache file `cache` (`cache_path`) unless it exists: a process that has counted
        them spares the ones it starts the counting."""
        fs, path = fsspec.core.url_to_fs(cache)
        if not fs.exists(path):
            save_tables(self.tables, fs, path)

    def describe(self) -> str:
        """One line: the counted groups and what they were counted over."""
        t = self.tables
        rows = sum(self.inner.num_rows(d) for d in t.days)
        cols = ", ".join(" x ".join(g) for g in t.groups) or "none"
        span = f"the last {t.window} days before its own" if t.window else "the days before its own"
        return (f"data.counts: {len(t.groups)} count columns ({cols}) "
                f"over {rows:,} rows of {len(t.days)} days, each row's from {span} ({self.origin})")

    def __getattr__(self, name: str):  # noqa: ANN204 - whatever the wrapped source has
        if name == "inner":  # not set yet (unpickling): do not recurse
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _augment(self, batch: Batch) -> Batch:
        sparse = {k: _first_ids(batch.sparse[k]) for k in {k for g in self.tables.groups for k in g}}
        days = batch.day.numpy()
        extra = np.zeros((len(batch), len(self.tables.groups)), np.float32)
        for d in np.unique(days):
            rows = days == d
            extra[rows] = self.tables.lookup(int(d), {k: v[rows] for k, v in sparse.items()})
        return dataclasses.replace(batch, dense=torch.cat([batch.dense, torch.from_numpy(extra)], 1))

    def read(self, day: int, start: int, stop: int, view: SamplingConfig | None = None) -> Batch:
        return self._augment(read_view(self.inner, day, start, stop, view))

    @property
    def read_ids(self):  # noqa: ANN201 - a property, so hasattr(source, "read_ids") answers for the wrapped source
        """The wrapped source's read_ids(sample_ids, view=None), with the counting features."""
        inner = self.inner.read_ids
        return lambda sample_ids, view=None: self._augment(inner(sample_ids, view=view))
