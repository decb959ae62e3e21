"""Bring-your-own data: the Parquet layout of DESIGN §4, a writer (`recdistill data export`) and a reader.

Layout: a directory (any fsspec URI) of Parquet files, one row per sample, written by us as
``DIR/day=D/part-NNNNN.parquet``; any file names work for reading (all ``*.parquet`` below DIR, sorted).

    sample_id int64 (unique)   day int32   traffic int32
    label_<task> float32       p_true_<task> float32 (optional ground truth)
    dense_<name> float32       sparse_<name> int64 or list<int64>
    hist_<name> list<int64>    (oldest first; every hist list of a row has the same length; hist_item required)

Key-value metadata: ``recdistill.sampling`` (SamplingConfig JSON: the view that produced the rows),
``recdistill.tasks`` (JSON list of {name, kind}), ``recdistill.schema`` (JSON: sparse / history cardinalities,
num_traffic). Without them the reader infers: binary when every label is 0/1, cardinality = max id + 1.
Every problem is a :class:`DataError` naming the file and the column.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recdistill.data.batch import Batch, History, Schema, TaskSpec, offsets_from_lengths
from recdistill.data.sampling import SamplingConfig

META_SAMPLING, META_TASKS, META_SCHEMA = b"recdistill.sampling", b"recdistill.tasks", b"recdistill.schema"
REQUIRED = {"sample_id": pa.int64(), "day": pa.int32(), "traffic": pa.int32()}


class DataError(ValueError):
    """A data file is unusable; the message names the file and the column."""


def _is_int_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)


def check_columns(schema: pa.Schema, path: str) -> None:
    """Column names and types by role (DESIGN §4); raises DataError naming the file and the column."""
    names = set(schema.names)
    for col, typ in REQUIRED.items():
        if col not in names:
            raise DataError(f"{path}: missing required column '{col}' ({typ})")
        if not pa.types.is_integer(schema.field(col).type):
            raise DataError(f"{path}: column '{col}' has type {schema.field(col).type}, expected {typ}")
    if "hist_item" not in names:
        raise DataError(f"{path}: missing required column 'hist_item' (list<int64>)")
    if not any(n.startswith("label_") for n in names):
        raise DataError(f"{path}: no label column (label_<task>, float32)")
    for f in schema:
        t = f.type
        numeric = pa.types.is_floating(t) or pa.types.is_integer(t)
        if f.name.startswith(("label_", "p_true_", "dense_")) and not numeric:
            raise DataError(f"{path}: column '{f.name}' has type {t}, expected float32")
        if f.name.startswith("sparse_") and not (pa.types.is_integer(t) or _is_int_list(t)):
            raise DataError(f"{path}: column '{f.name}' has type {t}, expected int64 or list<int64>")
        if f.name.startswith("hist_") and not _is_int_list(t):
            raise DataError(f"{path}: column '{f.name}' has type {t}, expected list<int64>")


@dataclass
class _Run:
    """Rows [start, stop) of one file that belong to one day."""

    file: str
    start: int
    stop: int


class ParquetSource:
    """DataSource over a directory of Parquet files in the layout above (vectorised Arrow -> tensors)."""

    def __init__(self, path: str, history_len: int | None = None) -> None:
        self.path, self.history_len = str(path), history_len
        self.fs, root = fsspec.core.url_to_fs(self.path)
        if not self.fs.exists(root):
            raise DataError(f"{self.path}: no such directory")
        self.files = sorted(p for p in self.fs.find(root) if p.endswith(".parquet"))
        if not self.files:
            raise DataError(f"{self.path}: no *.parquet files")
        self._cache: tuple[str, pa.Table] | None = None
        self.runs: dict[int, list[_Run]] = {}
        first_schema, first_meta = None, None
        ids = []
        for f in self.files:
            pf = self._open(f)
            check_columns(pf.schema_arrow, f)
            meta = {k: v for k, v in (pf.schema_arrow.metadata or {}).items() if k.startswith(b"recdistill.")}
            if first_schema is None:
                first_schema, first_meta = pf.schema_arrow.remove_metadata(), meta
            elif pf.schema_arrow.remove_metadata() != first_schema:
                raise DataError(f"{f}: columns differ from {self.files[0]}: "
                                f"{sorted(set(pf.schema_arrow.names) ^ set(first_schema.names)) or 'column types'}")
            elif meta.get(META_SAMPLING) != first_meta.get(META_SAMPLING):
                raise DataError(f"{f}: metadata '{META_SAMPLING.decode()}' differs from {self.files[0]}")
            cols = self._read_columns(pf, f, ["sample_id", "day"])
            day = cols["day"].to_numpy()
            ids.append(cols["sample_id"].to_numpy())
            cut = np.flatnonzero(np.diff(day)) + 1
            for s, e in zip(np.r_[0, cut], np.r_[cut, len(day)], strict=True):
                self.runs.setdefault(int(day[s]), []).append(_Run(f, int(s), int(e)))
        all_ids = np.concatenate(ids)
        uniq, counts = np.unique(all_ids, return_counts=True)
        if len(uniq) != len(all_ids):
            dup = int(uniq[counts > 1][0])
            where = [f for f, a in zip(self.files, ids, strict=True) if np.any(a == dup)]
            raise DataError(f"{', '.join(where)}: column 'sample_id' has duplicates (e.g. {dup})")
        self._columns = first_schema.names
        self.sampling = SamplingConfig.model_validate_json(first_meta[META_SAMPLING]) \
            if META_SAMPLING in first_meta else None
        self.schema = self._schema(first_meta)

    # ---- file access -----------------------------------------------------------------------------------------
    def _open(self, f: str) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(self.fs.open(f, "rb"))
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{f}: not a readable Parquet file (truncated or corrupt?): {exc}") from None

    def _read_columns(self, pf: pq.ParquetFile, f: str, columns: list[str] | None = None) -> pa.Table:
        try:
            return pf.read(columns=columns)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{f}: reading columns {columns or 'all'} failed (truncated or corrupt?): {exc}") from None

    def _table(self, f: str) -> pa.Table:
        if self._cache is None or self._cache[0] != f:
            self._cache = (f, self._read_columns(self._open(f), f))
        return self._cache[1]

    # ---- schema --------------------------------------------------------------------------------------------
    def _schema(self, meta: dict) -> Schema:
        cols = self._columns
        label_names = [c[len("label_"):] for c in cols if c.startswith("label_")]
        if META_TASKS in meta:
            tasks = tuple(TaskSpec(t["name"], t["kind"]) for t in json.loads(meta[META_TASKS]))
            missing = [t.name for t in tasks if t.name not in label_names]
            if missing:
                raise DataError(f"{self.files[0]}: metadata names tasks {missing} without a 'label_<task>' column")
        else:  # infer: binary when every label is 0 or 1
            tasks = tuple(TaskSpec(n, "binary" if self._all_binary(f"label_{n}") else "continuous")
                          for n in label_names)
        declared = json.loads(meta[META_SCHEMA]) if META_SCHEMA in meta else {}
        sparse = {c[len("sparse_"):]: int(declared.get("sparse", {}).get(c[len("sparse_"):], 0)) or self._max_id(c)
                  for c in cols if c.startswith("sparse_")}
        hist = {c[len("hist_"):]: int(declared.get("history", {}).get(c[len("hist_"):], 0)) or self._max_id(c)
                for c in cols if c.startswith("hist_")}
        num_traffic = int(declared.get("num_traffic", 0)) or self._max_id("traffic")
        return Schema(tasks=tasks, dense=tuple(c[len("dense_"):] for c in cols if c.startswith("dense_")),
                      sparse=sparse, history=hist, num_traffic=num_traffic,
                      max_history=self.history_len or int(declared.get("max_history", 0)) or 0)

    def _scan(self, column: str):
        for f in self.files:
            arr = self._read_columns(self._open(f), f, [column]).column(0)
            yield pc.list_flatten(arr) if _is_int_list(arr.type) else arr

    def _max_id(self, column: str) -> int:
        return max(int(pc.max(a).as_py() or 0) for a in self._scan(column)) + 1

    def _all_binary(self, column: str) -> bool:
        return all(bool(pc.all(pc.is_in(a, pa.array([0.0, 1.0], a.type))).as_py()) for a in self._scan(column))

    # ---- DataSource ----------------------------------------------------------------------------------------
    def days(self) -> list[int]:
        return sorted(self.runs)

    def num_rows(self, day: int) -> int:
        return sum(r.stop - r.start for r in self.runs.get(day, []))

    def read(self, day: int, start: int, stop: int) -> Batch:
        """Rows [start, stop) of `day` (in file order) as a Batch."""
        pieces, offset = [], 0
        for run in self.runs.get(day, []):
            lo, hi = max(start - offset, 0), min(stop - offset, run.stop - run.start)
            if lo < hi:
                pieces.append((run.file, self._table(run.file).slice(run.start + lo, hi - lo)))
            offset += run.stop - run.start
        if not pieces:
            raise ValueError(f"{self.path}: day {day} has no rows [{start}, {stop})")
        return Batch.concat([self._to_batch(t, f) for f, t in pieces])

    def _to_batch(self, t: pa.Table, f: str) -> Batch:
        def num(col: str, dtype) -> torch.Tensor:  # noqa: ANN001
            arr = t.column(col)
            if arr.null_count:
                raise DataError(f"{f}: column '{col}' has {arr.null_count} null values")
            return torch.from_numpy(arr.to_numpy().astype(dtype))  # a writable copy (Arrow buffers are read-only)

        def jagged(col: str) -> tuple[torch.Tensor, torch.Tensor]:
            arr = t.column(col)
            if pa.types.is_integer(arr.type):
                return torch.ones(len(arr), dtype=torch.int64), num(col, np.int64)
            lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int64)
            values = pc.list_flatten(arr).to_numpy().astype(np.int64)
            return torch.from_numpy(lengths), torch.from_numpy(values)

        n = t.num_rows
        names = self.schema
        sparse_lv = [jagged(f"sparse_{k}") for k in names.sparse]
        sparse = KeyedJaggedTensor(
            keys=list(names.sparse), stride=n,
            values=torch.cat([v for _, v in sparse_lv]) if sparse_lv else torch.empty(0, dtype=torch.int64),
            lengths=torch.cat([ln for ln, _ in sparse_lv]) if sparse_lv else torch.empty(0, dtype=torch.int64))
        hist_lengths, fields = None, {}
        for k in names.history:
            lengths, values = jagged(f"hist_{k}")
            if hist_lengths is None:
                hist_lengths = lengths
            elif not torch.equal(lengths, hist_lengths):
                row = int((lengths != hist_lengths).nonzero()[0])
                raise DataError(f"{f}: column 'hist_{k}' has a different length than 'hist_"
                                f"{next(iter(names.history))}' in row {row} of this slice")
            fields[k] = values
        history = History(offsets_from_lengths(hist_lengths), fields)
        if self.history_len is not None:
            history = history.last(self.history_len)
        dense = torch.stack([num(f"dense_{d}", np.float32) for d in names.dense], 1) if names.dense else \
            torch.zeros(n, 0)
        has_truth = [x.name for x in names.tasks if f"p_true_{x.name}" in self._columns]
        return Batch(
            sample_id=num("sample_id", np.int64), day=num("day", np.int32), traffic=num("traffic", np.int64),
            labels={x.name: num(f"label_{x.name}", np.float32) for x in names.tasks},
            dense=dense, sparse=sparse, history=history, sampling=self.sampling,
            p_true={k: num(f"p_true_{k}", np.float32) for k in has_truth} if has_truth else None)


def batch_to_table(b: Batch, schema: Schema) -> pa.Table:
    """One Batch as an Arrow table in the layout above (single-id sparse features as plain int64)."""
    cols: dict[str, pa.Array] = {
        "sample_id": pa.array(b.sample_id.numpy(), pa.int64()),
        "day": pa.array(b.day.numpy().astype(np.int32)),
        "traffic": pa.array(b.traffic.numpy().astype(np.int32)),
    }
    for k, v in b.labels.items():
        cols[f"label_{k}"] = pa.array(v.numpy().astype(np.float32))
    for k, v in (b.p_true or {}).items():
        cols[f"p_true_{k}"] = pa.array(v.numpy().astype(np.float32))
    for i, name in enumerate(schema.dense):
        cols[f"dense_{name}"] = pa.array(b.dense[:, i].numpy().astype(np.float32))
    for k in b.sparse.keys():
        jt = b.sparse[k]
        lengths = jt.lengths()
        if bool((lengths == 1).all()):
            cols[f"sparse_{k}"] = pa.array(jt.values().numpy(), pa.int64())
        else:
            cols[f"sparse_{k}"] = pa.ListArray.from_arrays(pa.array(jt.offsets().numpy().astype(np.int32)),
                                                           pa.array(jt.values().numpy(), pa.int64()))
    offs = b.history.offsets.numpy()
    if offs[-1] >= 2**31:
        raise ValueError(f"{int(offs[-1])} history events in one file: lower rows_per_file")
    offs32 = pa.array(offs.astype(np.int32))
    for k, v in b.history.fields.items():
        cols[f"hist_{k}"] = pa.ListArray.from_arrays(offs32, pa.array(v.numpy(), pa.int64()))
    return pa.table(cols)


def layout_metadata(schema: Schema, sampling: SamplingConfig | None) -> dict[bytes, bytes]:
    """The recdistill.* key-value metadata for files of a source with `schema` under view `sampling`."""
    meta = {META_TASKS: json.dumps([{"name": t.name, "kind": t.kind} for t in schema.tasks]).encode(),
            META_SCHEMA: json.dumps({"sparse": schema.sparse, "history": schema.history,
                                     "num_traffic": schema.num_traffic, "max_history": schema.max_history}).encode()}
    if sampling is not None:
        meta[META_SAMPLING] = sampling.model_dump_json().encode()
    return meta


def write_parquet(source, out_dir: str, days: list[int] | None = None, view: SamplingConfig | None = None,  # noqa: ANN001
                  rows_per_file: int = 50_000, progress: bool = True) -> list[str]:
    """Write `source` (any DataSource) as DIR/day=D/part-NNNNN.parquet, optionally under a sampled view; returns
    the files written. Rows per file count source rows before sampling."""
    from recdistill.data.loader import apply_view, check_nested
    from recdistill.tracking import progress as bar

    days = source.days() if days is None else days
    sampling = source.sampling
    if view is not None:
        check_nested(view, source.sampling, source.schema.num_traffic)
        sampling = view
    meta = layout_metadata(source.schema, sampling)
    fs, root = fsspec.core.url_to_fs(str(out_dir))
    written = []
    chunks = [(d, s) for d in days for s in range(0, source.num_rows(d), rows_per_file)]
    for i, (day, start) in enumerate(bar(chunks, desc="export", enabled=progress)):
        b = source.read(day, start, min(start + rows_per_file, source.num_rows(day)))
        if view is not None:
            b = apply_view(b, view, source.schema.num_traffic)
        table = batch_to_table(b, source.schema).replace_schema_metadata(meta)
        path = str(PurePosixPath(root) / f"day={day}" / f"part-{i:05d}.parquet")
        fs.makedirs(str(PurePosixPath(path).parent), exist_ok=True)
        with fs.open(path, "wb") as fh:
            pq.write_table(table, fh)
        written.append(path)
    return written
