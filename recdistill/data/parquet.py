"""Bring-your-own data: the Parquet layout of DESIGN §4, a writer (`recdistill data export`) and a reader.

Layout: a directory (any fsspec URI) of Parquet files, one row per sample. The reader takes every ``*.parquet``
below DIR (sorted by path; rows of a day keep that file order). The writer produces one directory per day,
``DIR/day=D/part-NNNNN.parquet`` (several parts when a day has more than `rows_per_file` rows), each file made of
row groups of at most `row_group_rows` rows:

    sample_id int64 (unique)   day int32   traffic int32
    label_<task> float32       p_true_<task> float32 (optional ground truth)
    dense_<name> float32       sparse_<name> int64 or list<int64>
    hist_<name> list<int64>    (oldest first; every hist list of a row has the same length; hist_item required)

Key-value metadata: ``recdistill.sampling`` (SamplingConfig JSON: the view that produced the rows),
``recdistill.tasks`` (JSON list of {name, kind}), ``recdistill.schema`` (JSON: sparse / history cardinalities,
num_traffic, max_history, and `roles`: {user, item, category, hist_item, hist_category, hist_action}, each a sparse
feature / history field name without its prefix, or null for none). Without them the reader infers: binary when
every label is 0/1, cardinality = max id + 1, a role = its conventional name (user_id, item_id, item_cat; item,
cat, action) when that column exists. Every problem is a :class:`DataError` naming the file and the column.

Memory: opening a directory reads only the footers, the `day` column where row-group statistics do not already
pin the day, and `sample_id` (uniqueness check); `read` decodes one row group at a time (one is cached, so a
loader walking a day in order decodes each group once).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recdistill.config import DataConfig, SamplingConfig
from recdistill.data.batch import CONVENTIONAL_ROLES, Batch, History, Roles, Schema, TaskSpec, offsets_from_lengths
from recdistill.data.roles import source_roles
from recdistill.data.sampling import keep_mask
from recdistill.data.source import DataSource, apply_view, check_nested, read_view
from recdistill.errors import RecdistillError
from recdistill.tracking import progress as bar

META_SAMPLING, META_TASKS, META_SCHEMA = b"recdistill.sampling", b"recdistill.tasks", b"recdistill.schema"
REQUIRED = {"sample_id": pa.int64(), "day": pa.int32(), "traffic": pa.int32()}


class DataError(RecdistillError, ValueError):
    """A data file is unusable; the message names the file and the column (`recdistill` exits with status 1)."""


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


def _meta(schema: pa.Schema) -> dict[bytes, bytes]:
    return {k: v for k, v in (schema.metadata or {}).items() if k.startswith(b"recdistill.")}


@dataclass(frozen=True)
class _Run:
    """Rows [start, stop) of row group `group` of `file`, all of one day."""

    file: str
    group: int
    start: int
    stop: int


class ParquetSource:
    """DataSource over a directory of Parquet files in the layout above (vectorised Arrow -> tensors).

    `history_len` keeps only the most recent events of each history. Unequal `hist_*` lists within a row are
    detected when the row is read (checking them up front would decode every history), as are ids outside
    [0, cardinality), traffic ids outside [0, num_traffic) and binary labels other than 0/1. Attributes besides the
    DataSource ones: `files` (sorted paths), `columns` (column names of every file), `list_sparse` (sparse features
    stored as list<int64>; `write_parquet` keeps them lists), `roles` (feature roles, recdistill/data/batch.py) and
    `role_origin` (per role: 'declared' in the metadata, 'default' (the conventional name's column exists) or
    'missing').
    """

    def __init__(self, path: str, history_len: int | None = None) -> None:
        self.path, self.history_len = str(path), history_len
        self.fs, root = fsspec.core.url_to_fs(self.path)
        if not self.fs.exists(root):
            raise DataError(f"{self.path}: no such directory")
        self.files = sorted(p for p in self.fs.find(root) if p.endswith(".parquet"))
        if not self.files:
            raise DataError(f"{self.path}: no *.parquet files")
        self._cache: tuple[tuple[str, int], pa.Table] | None = None
        self._key_cache: tuple[tuple[str, int, str], pa.Table] | None = None  # a group's view-decision columns
        self._handles: dict[str, tuple[pq.ParquetFile, object]] = {}  # a few open files, oldest first
        self.runs: dict[int, list[_Run]] = {}
        first_schema, first_meta, ids = None, {}, []
        for f in self.files:
            pf = self._open(f)
            check_columns(pf.schema_arrow, f)
            meta = _meta(pf.schema_arrow)
            if first_schema is None:
                first_schema, first_meta = pf.schema_arrow.remove_metadata(), meta
            elif pf.schema_arrow.remove_metadata() != first_schema:
                diff = sorted(set(pf.schema_arrow.names) ^ set(first_schema.names))
                if not diff:
                    diff = [f"{n}: {pf.schema_arrow.field(n).type} vs {first_schema.field(n).type}"
                            for n in first_schema.names if pf.schema_arrow.field(n).type != first_schema.field(n).type]
                raise DataError(f"{f}: columns differ from {self.files[0]}: {diff}")
            else:
                for key in (META_SAMPLING, META_TASKS, META_SCHEMA):
                    if meta.get(key) != first_meta.get(key):
                        raise DataError(f"{f}: metadata '{key.decode()}' differs from {self.files[0]}")
            ids.append(self._index_file(pf, f))
        self._check_unique(ids)
        self.columns = first_schema.names
        self.list_sparse = tuple(c[len("sparse_"):] for c in self.columns
                                 if c.startswith("sparse_") and _is_int_list(first_schema.field(c).type))
        try:
            self.sampling = SamplingConfig.model_validate_json(first_meta[META_SAMPLING]) \
                if META_SAMPLING in first_meta else None
        except ValueError as exc:
            raise DataError(f"{self.files[0]}: metadata 'recdistill.sampling' is not a SamplingConfig: {exc}") from None
        declared = self._declared(first_meta)
        self.schema = self._schema(first_meta, declared)
        self.roles, self.role_origin = self._roles(declared.get("roles", {}))

    @classmethod
    def from_config(cls, data_cfg: DataConfig) -> ParquetSource:
        """The source for `data.source=parquet` (the registry's entry point)."""
        return cls(data_cfg.path, history_len=data_cfg.history_len)

    # ---- file access -----------------------------------------------------------------------------------------
    def reopen(self) -> None:
        """Forget open files and cached row groups (a file handle shared with another process shares its offset,
        so concurrent reads would interleave)."""
        self._handles, self._cache, self._key_cache = {}, None, None

    def __getstate__(self) -> dict:
        # Pickled for the loader's worker processes: open files and cached row groups stay here.
        return {k: v for k, v in self.__dict__.items() if k not in ("_handles", "_cache", "_key_cache")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.reopen()

    def _open(self, f: str) -> pq.ParquetFile:
        if f not in self._handles:
            if len(self._handles) >= 8:  # bounded: a directory may hold thousands of files
                self._handles.pop(next(iter(self._handles)))[1].close()
            fh = self.fs.open(f, "rb")
            try:
                self._handles[f] = (pq.ParquetFile(fh), fh)
            except (pa.ArrowException, OSError) as exc:
                fh.close()
                raise DataError(f"{f}: not a readable Parquet file (truncated or corrupt?): {exc}") from None
        return self._handles[f][0]

    def _read(self, f: str, group: int | None, columns: list[str] | None) -> pa.Table:
        """Columns of one row group (or the whole file when group is None); decoding errors become DataError."""
        pf = self._open(f)
        try:
            return pf.read(columns=columns) if group is None else pf.read_row_group(group, columns=columns)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{f}: reading columns {columns or 'all'} failed (truncated or corrupt?): {exc}") from None

    def _group(self, f: str, group: int) -> pa.Table:
        if self._cache is None or self._cache[0] != (f, group):
            self._cache = ((f, group), self._read(f, group, None))
        return self._cache[1]

    def _index_file(self, pf: pq.ParquetFile, f: str) -> np.ndarray:
        """Add the file's (day, row group, row range) runs to the index; returns its sample ids."""
        md = pf.metadata
        day_col = next(i for i in range(md.num_columns) if md.schema.column(i).path == "day")
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            stats = md.row_group(g).column(day_col).statistics
            if n == 0:
                continue
            if stats is not None and stats.has_min_max and stats.min == stats.max and stats.null_count == 0:
                self.runs.setdefault(int(stats.min), []).append(_Run(f, g, 0, n))  # one day: no need to decode
                continue
            day = self._read(f, g, ["day"]).column(0)
            if day.null_count:
                raise DataError(f"{f}: column 'day' has {day.null_count} null values")
            day = day.to_numpy()
            cut = np.flatnonzero(np.diff(day)) + 1
            for s, e in zip(np.r_[0, cut], np.r_[cut, len(day)], strict=True):
                self.runs.setdefault(int(day[s]), []).append(_Run(f, g, int(s), int(e)))
        sid = self._read(f, None, ["sample_id"]).column(0)
        if sid.null_count:
            raise DataError(f"{f}: column 'sample_id' has {sid.null_count} null values")
        return sid.to_numpy()

    def _check_unique(self, ids: list[np.ndarray]) -> None:
        all_ids = np.concatenate(ids)
        uniq, counts = np.unique(all_ids, return_counts=True)
        if len(uniq) != len(all_ids):
            dup = int(uniq[counts > 1][0])
            where = [f for f, a in zip(self.files, ids, strict=True) if np.any(a == dup)]
            raise DataError(f"{', '.join(where)}: column 'sample_id' has duplicates (e.g. {dup})")

    # ---- schema --------------------------------------------------------------------------------------------
    def _declared(self, meta: dict) -> dict:
        """The `recdistill.schema` metadata as a dict ({} when absent)."""
        try:
            declared = json.loads(meta[META_SCHEMA]) if META_SCHEMA in meta else {}
            if not isinstance(declared, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise DataError(f"{self.files[0]}: metadata 'recdistill.schema' is not a JSON object: {exc}") from None
        return declared

    def _roles(self, given: object) -> tuple[Roles, dict[str, str]]:
        """Feature roles declared in the metadata, else the conventional names where those columns exist; and where
        each came from ('declared', 'default', 'missing')."""
        keys = CONVENTIONAL_ROLES.as_dict()
        if not isinstance(given, dict) or set(given) - set(keys):
            raise DataError(f"{self.files[0]}: metadata 'recdistill.schema' has roles {given!r}; expected an object "
                            f"with keys among {list(keys)}")
        out, origin = {}, {}
        for role, conventional in keys.items():
            sparse = role in Roles.SPARSE
            names, prefix = (self.schema.sparse, "sparse_") if sparse else (self.schema.history, "hist_")
            if role not in given:
                out[role] = conventional if conventional in names else None
                origin[role] = "default" if out[role] is not None else "missing"
                continue
            value = given[role]
            if value is not None and value not in names:
                raise DataError(f"{self.files[0]}: metadata 'recdistill.schema' declares role {role}={value!r} but "
                                f"there is no column '{prefix}{value}'; {prefix}* columns: {sorted(names)}")
            out[role], origin[role] = value, "declared"
        return Roles(**out), origin

    def _schema(self, meta: dict, declared: dict) -> Schema:
        cols = self.columns
        label_names = [c[len("label_"):] for c in cols if c.startswith("label_")]
        if META_TASKS in meta:
            try:
                tasks = tuple(TaskSpec(t["name"], t["kind"], t.get("within")) for t in json.loads(meta[META_TASKS]))
                bad = [t.kind for t in tasks if t.kind not in ("binary", "continuous")]
                if bad:
                    raise ValueError(f"kind {bad[0]!r} is not 'binary' or 'continuous'")
            except (ValueError, TypeError, KeyError) as exc:
                raise DataError(f"{self.files[0]}: metadata 'recdistill.tasks' is not a list of "
                                f"{{name, kind}}: {exc!r}") from None
            missing = [t.name for t in tasks if t.name not in label_names]
            if missing:
                raise DataError(f"{self.files[0]}: metadata names tasks {missing} without a 'label_<task>' column")
        else:  # infer: binary when every label is 0 or 1; within the first binary task when zero wherever it is
            kinds = {n: "binary" if self._all_binary(f"label_{n}") else "continuous" for n in label_names}
            first = next((n for n, k in kinds.items() if k == "binary"), None)
            tasks = tuple(TaskSpec(n, k, first if first not in (None, n) and self._zero_where_zero(n, first) else None)
                          for n, k in kinds.items())

        def card(role: str, prefix: str, name: str) -> int:
            return int(declared.get(role, {}).get(name, 0)) or self._max_id(prefix + name)

        sparse = {c[7:]: card("sparse", "sparse_", c[7:]) for c in cols if c.startswith("sparse_")}
        hist = {c[5:]: card("history", "hist_", c[5:]) for c in cols if c.startswith("hist_")}
        num_traffic = int(declared.get("num_traffic", 0)) or self._max_id("traffic")
        return Schema(tasks=tasks, dense=tuple(c[len("dense_"):] for c in cols if c.startswith("dense_")),
                      sparse=sparse, history=hist, num_traffic=num_traffic,
                      max_history=self.history_len or int(declared.get("max_history", 0)) or 0)

    def _scan(self, column: str):
        """One column, file by file (flattened when it is a list column)."""
        for f in self.files:
            arr = self._read(f, None, [column]).column(0)
            yield pc.list_flatten(arr) if _is_int_list(arr.type) else arr

    def _zero_where_zero(self, task: str, other: str) -> bool:
        """Every row whose `other` label is 0 has a 0 `task` label (and some rows have `other` = 0)."""
        seen = False
        for f in self.files:
            t = self._read(f, None, [f"label_{task}", f"label_{other}"])
            off = pc.equal(t.column(1), 0)
            seen = seen or bool(pc.any(off).as_py())
            if pc.any(pc.and_(off, pc.not_equal(t.column(0), 0))).as_py():
                return False
        return seen

    def _max_id(self, column: str) -> int:
        return max(int(pc.max(a).as_py() or 0) for a in self._scan(column)) + 1

    def _all_binary(self, column: str) -> bool:
        return all(bool(pc.all(pc.is_in(a, pa.array([0.0, 1.0], a.type))).as_py()) for a in self._scan(column))

    # ---- DataSource ----------------------------------------------------------------------------------------
    def days(self) -> list[int]:
        return sorted(self.runs)

    def num_rows(self, day: int) -> int:
        return sum(r.stop - r.start for r in self.runs.get(day, []))

    def _pieces(self, day: int, start: int, stop: int) -> list[tuple[_Run, int, int]]:
        """(run, first row, row count) within each row group that rows [start, stop) of `day` touch."""
        if day not in self.runs or not 0 <= start < stop <= self.num_rows(day):
            raise ValueError(f"{self.path}: day {day} has no rows [{start}, {stop}) (it has {self.num_rows(day)})")
        out, offset = [], 0
        for run in self.runs[day]:
            lo, hi = max(start - offset, 0), min(stop - offset, run.stop - run.start)
            if lo < hi:
                out.append((run, run.start + lo, hi - lo))
            offset += run.stop - run.start
        return out

    def read(self, day: int, start: int, stop: int, view: SamplingConfig | None = None) -> Batch:
        """Rows [start, stop) of `day` (in file order) as a Batch; with `view`, only the rows it keeps.

        Pushdown: the keep decision reads only sample_id, traffic and the view's label column, and the other columns
        of the kept rows alone are converted and checked. Parquet decodes a column by pages, and pyarrow has no row
        selection below that, so the row group's other columns are still decoded whole when any of its rows is kept.
        """
        parts = []
        for r, lo, n in self._pieces(day, start, stop):
            if view is None:
                parts.append(self._to_batch(self._group(r.file, r.group).slice(lo, n), r.file))
                continue
            keep = self._keep(r, lo, n, view)
            if parts and not keep.any():
                continue  # a fully dropped piece is never decoded (the first is kept: it gives an empty Batch)
            parts.append(self._to_batch(self._group(r.file, r.group).slice(lo, n).filter(pa.array(keep)), r.file))
        out = Batch.concat(parts)
        if view is not None:
            out.sampling = view
        return out

    def _keep(self, run: _Run, lo: int, n: int, view: SamplingConfig) -> np.ndarray:
        """Keep decision of `view` for rows [lo, lo + n) of a run's row group, from its key columns alone."""
        label = f"label_{view.task}"
        key = (run.file, run.group, label)
        if self._key_cache is None or self._key_cache[0] != key:  # a loader reads a group's chunks in turn
            self._key_cache = (key, self._read(run.file, run.group, ["sample_id", "traffic", label]))
        t = self._key_cache[1].slice(lo, n)
        for col in t.column_names:
            if t.column(col).null_count:
                raise DataError(f"{run.file}: column '{col}' has {t.column(col).null_count} null values")
        traffic = _in_range(run.file, "traffic", torch.from_numpy(t.column("traffic").to_numpy().astype(np.int64)),
                            self.schema.num_traffic).numpy()
        return keep_mask(t.column("sample_id").to_numpy(), t.column(label).to_numpy() > 0.5, traffic, view,
                         self.schema.num_traffic)

    def read_columns(self, day: int, columns: list[str], start: int = 0, stop: int | None = None) -> pa.Table:
        """Some columns of rows [start, stop) of `day` (default: every row) as one Arrow table (for summaries and
        counts: decodes only those columns)."""
        stop = self.num_rows(day) if stop is None else stop
        return pa.concat_tables([self._read(r.file, r.group, columns).slice(lo, n)
                                 for r, lo, n in self._pieces(day, start, stop)])

    def sparse_ids(self, day: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """The single-valued (integer-column) sparse features of rows [start, stop) of `day`, one id per row;
        decodes only those columns (what the counting features read: recdistill/data/counts.py)."""
        t = self.read_columns(day, [f"sparse_{k}" for k in self.schema.sparse], start, stop)
        out = {}
        for k in self.schema.sparse:
            arr = t.column(f"sparse_{k}")
            if pa.types.is_integer(arr.type):
                if arr.null_count:
                    raise DataError(f"{self.path}: column 'sparse_{k}' of day {day} has {arr.null_count} null values")
                out[k] = arr.to_numpy().astype(np.int64)
        return out

    def _to_batch(self, t: pa.Table, f: str) -> Batch:
        def num(col: str, dtype) -> torch.Tensor:  # noqa: ANN001
            arr = t.column(col)
            if arr.null_count:
                raise DataError(f"{f}: column '{col}' has {arr.null_count} null values")
            return torch.from_numpy(arr.to_numpy().astype(dtype))  # a writable copy (Arrow buffers are read-only)

        def jagged(col: str, card: int) -> tuple[torch.Tensor, torch.Tensor]:
            arr = t.column(col)
            if pa.types.is_integer(arr.type):
                return torch.ones(len(arr), dtype=torch.int64), _in_range(f, col, num(col, np.int64), card)
            lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int64)  # a null list = empty
            flat = pc.list_flatten(arr)
            if flat.null_count:
                raise DataError(f"{f}: column '{col}' has {flat.null_count} null ids inside its lists")
            return torch.from_numpy(lengths), _in_range(f, col, torch.from_numpy(flat.to_numpy().astype(np.int64)),
                                                         card)

        n = t.num_rows
        names = self.schema
        sparse_lv = [jagged(f"sparse_{k}", c) for k, c in names.sparse.items()]
        sparse = KeyedJaggedTensor(
            keys=list(names.sparse), stride=n,
            values=torch.cat([v for _, v in sparse_lv]) if sparse_lv else torch.empty(0, dtype=torch.int64),
            lengths=torch.cat([ln for ln, _ in sparse_lv]) if sparse_lv else torch.empty(0, dtype=torch.int64))
        hist_lengths, fields = None, {}
        for k, card in names.history.items():
            lengths, values = jagged(f"hist_{k}", card)
            if hist_lengths is None:
                hist_lengths = lengths
            elif not torch.equal(lengths, hist_lengths):
                row = int((lengths != hist_lengths).nonzero()[0])
                raise DataError(f"{f}: column 'hist_{k}' has a different length than 'hist_"
                                f"{next(iter(names.history))}' in the row with sample_id "
                                f"{t.column('sample_id')[row].as_py()}")
            fields[k] = values
        history = History(offsets_from_lengths(hist_lengths), fields)
        if self.history_len is not None:
            history = history.last(self.history_len)
        dense = torch.stack([num(f"dense_{d}", np.float32) for d in names.dense], 1) if names.dense else \
            torch.zeros(n, 0)
        has_truth = [x.name for x in names.tasks if f"p_true_{x.name}" in self.columns]
        labels = {x.name: num(f"label_{x.name}", np.float32) for x in names.tasks}
        for x in names.tasks:  # a declared-binary task with other values would silently train BCE on them
            bad = labels[x.name][(labels[x.name] != 0) & (labels[x.name] != 1)] if x.kind == "binary" else ()
            if len(bad):
                raise DataError(f"{f}: column 'label_{x.name}' of binary task '{x.name}' has value "
                                f"{float(bad[0])} (binary labels are 0 or 1)")
        return Batch(
            sample_id=num("sample_id", np.int64), day=num("day", np.int32),
            traffic=_in_range(f, "traffic", num("traffic", np.int64), names.num_traffic), labels=labels,
            dense=dense, sparse=sparse, history=history, sampling=self.sampling,
            p_true={k: num(f"p_true_{k}", np.float32) for k in has_truth} if has_truth else None)


def _in_range(f: str, col: str, ids: torch.Tensor, card: int) -> torch.Tensor:
    """`ids` when all lie in [0, card) (what an embedding table of `card` rows can look up), else DataError."""
    if ids.numel():
        lo, hi = torch.aminmax(ids)
        if lo < 0 or hi >= card:
            bad = int(lo) if lo < 0 else int(hi)
            raise DataError(f"{f}: column '{col}' has id {bad} outside [0, {card}) (ids are >= 0 and below the "
                            "cardinality, or num_traffic, declared in metadata 'recdistill.schema')")
    return ids


# ---- writing ---------------------------------------------------------------------------------------------------


def batch_to_table(b: Batch, schema: Schema, list_sparse: Iterable[str] | None = None) -> pa.Table:
    """One Batch as an Arrow table in the layout above.

    Sparse features named in `list_sparse` are written as list<int64>, the others (which must then have exactly
    one id per row) as int64; None: list<int64> for exactly the features with a row of other than one id.
    """
    if list_sparse is None:
        list_sparse = {k for k in b.sparse.keys() if not bool((b.sparse[k].lengths() == 1).all())}
    list_sparse = set(list_sparse)
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
        if k in list_sparse:
            cols[f"sparse_{k}"] = pa.ListArray.from_arrays(pa.array(jt.offsets().numpy().astype(np.int32)),
                                                           pa.array(jt.values().numpy(), pa.int64()))
        elif bool((jt.lengths() == 1).all()):
            cols[f"sparse_{k}"] = pa.array(jt.values().numpy(), pa.int64())
        else:
            raise ValueError(f"sparse feature '{k}' has rows with other than one id: write it as a list "
                             f"(list_sparse=[..., '{k}'])")
    offs = b.history.offsets.numpy()
    if offs[-1] >= 2**31:
        raise ValueError(f"{int(offs[-1])} history events in one row group: lower row_group_rows")
    offs32 = pa.array(offs.astype(np.int32))
    for k, v in b.history.fields.items():
        cols[f"hist_{k}"] = pa.ListArray.from_arrays(offs32, pa.array(v.numpy(), pa.int64()))
    return pa.table(cols)


def layout_metadata(schema: Schema, sampling: SamplingConfig | None, roles: Roles | None = None) -> dict[bytes, bytes]:
    """The recdistill.* key-value metadata for files of a source with `schema` (and feature `roles`, if given)
    under view `sampling`."""
    described = {"sparse": schema.sparse, "history": schema.history, "num_traffic": schema.num_traffic,
                 "max_history": schema.max_history}
    if roles is not None:
        described["roles"] = roles.as_dict()
    meta = {META_TASKS: json.dumps([{"name": t.name, "kind": t.kind, "within": t.within}
                                    for t in schema.tasks]).encode(),
            META_SCHEMA: json.dumps(described).encode()}
    if sampling is not None:
        meta[META_SAMPLING] = sampling.model_dump_json().encode()
    return meta


class _DayFiles:
    """Open writers, one per day: DIR/day=D/part-NNNNN.parquet, a new part after `rows_per_file` rows."""

    def __init__(self, out_dir: str, meta: dict[bytes, bytes], rows_per_file: int, list_sparse: set[str]) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(str(out_dir))
        self.meta, self.rows_per_file, self.list_sparse = meta, rows_per_file, list_sparse
        self.open: dict[int, tuple[pq.ParquetWriter, object, int]] = {}  # day -> (writer, file handle, rows)
        self.parts: dict[int, int] = {}
        self.written: list[str] = []
        self.arrow_schema: pa.Schema | None = None

    def write(self, b: Batch, schema: Schema) -> None:
        if len(b) == 0:
            return
        multi = {k for k in b.sparse.keys() if not bool((b.sparse[k].lengths() == 1).all())}
        if self.arrow_schema is None:  # multi-id features are fixed by the first rows written
            self.list_sparse |= multi
        elif multi - self.list_sparse:
            k = sorted(multi - self.list_sparse)[0]
            raise ValueError(f"sparse feature '{k}' had one id per row in the first rows written (so its column is "
                             f"int64) but several later: pass list_sparse=['{k}'] (or give the source a `list_sparse` "
                             f"attribute); the files written under {self.root} are incomplete")
        table = batch_to_table(b, schema, self.list_sparse)
        if self.arrow_schema is None:
            self.arrow_schema = table.schema.with_metadata(self.meta)
        table = table.cast(self.arrow_schema)
        days = b.day.numpy()
        if np.any(np.diff(days) < 0):  # rows of a day together, in their order (a stable sort)
            order = np.argsort(days, kind="stable")
            days, table = days[order], table.take(pa.array(order))
        cut = np.flatnonzero(np.diff(days)) + 1
        for s, e in zip(np.r_[0, cut], np.r_[cut, len(days)], strict=True):
            self._append(int(days[s]), table.slice(s, e - s))

    def _append(self, day: int, table: pa.Table) -> None:
        writer, fh, rows = self.open.get(day, (None, None, 0))
        if writer is None:
            part = self.parts.get(day, 0)
            self.parts[day] = part + 1
            path = str(PurePosixPath(self.root) / f"day={day}" / f"part-{part:05d}.parquet")
            self.fs.makedirs(str(PurePosixPath(path).parent), exist_ok=True)
            fh = self.fs.open(path, "wb")
            writer = pq.ParquetWriter(fh, self.arrow_schema)
            self.written.append(path)
        writer.write_table(table, row_group_size=max(table.num_rows, 1))  # each write is one row group
        rows += table.num_rows
        self.open[day] = (writer, fh, rows)
        if rows >= self.rows_per_file:
            self.close(day)

    def close(self, day: int | None = None) -> None:
        for d in [day] if day is not None else list(self.open):
            if d in self.open:
                writer, fh, _ = self.open.pop(d)
                writer.close()
                fh.close()


def write_parquet(source_or_batches, out_dir: str, days: list[int] | None = None,  # noqa: ANN001
                  view: SamplingConfig | None = None, rows_per_file: int = 200_000, *, row_group_rows: int = 4096,
                  schema: Schema | None = None, list_sparse: Iterable[str] = (), roles: Roles | None = None,
                  progress: bool = True) -> list[str]:
    """Write samples in the layout above as DIR/day=D/part-NNNNN.parquet; returns the files written.

    `source_or_batches` is a DataSource (its `days`, default all, are read `row_group_rows` rows at a time) or an
    iterable of Batches (then `schema` is required and `days` must be None). Sparse features with several ids in
    some row of the first batch, in `list_sparse` or in the source's `list_sparse` attribute become list<int64>
    columns, the others int64. `view` keeps only the rows a sampled view keeps and records it as
    `recdistill.sampling`; otherwise the source's own sampling is recorded. `roles` (default: a source's own,
    none for Batches) are recorded in `recdistill.schema`, so the files are read with them. Files hold at most
    about `rows_per_file` rows (written rows, after sampling).
    """


    is_source = isinstance(source_or_batches, DataSource)
    if is_source:
        src = source_or_batches
        schema = src.schema
        days = src.days() if days is None else list(days)
        chunks = [(d, s, min(s + row_group_rows, src.num_rows(d))) for d in days
                  for s in range(0, src.num_rows(d), row_group_rows)]
        batches = (read_view(src, d, s, e, view) for d, s, e in bar(chunks, desc="export", enabled=progress))
        sampling = src.sampling
        list_sparse = {*list_sparse, *getattr(src, "list_sparse", ())}  # a source may declare its multi-id features
        roles = roles if roles is not None else source_roles(src)
    else:
        if schema is None or days is not None:
            raise ValueError("write_parquet of Batches needs schema= and takes no days=")
        batches = iter(source_or_batches)
        first = next(batches, None)
        if first is None:
            return []
        sampling = first.sampling
        batches = _chain(first, batches)
    if view is not None:
        check_nested(view, sampling, schema.num_traffic)
        sampling = view
    if roles is not None:
        roles.check(schema)
    files = _DayFiles(out_dir, layout_metadata(schema, sampling, roles), rows_per_file, set(list_sparse))
    try:
        for b in batches:
            if not is_source:  # a source's rows were read through the view already
                b = apply_view(b, view, schema.num_traffic)
            files.write(b, schema)
    finally:
        files.close()
    return files.written


def _chain(first: Batch, rest: Iterable[Batch]) -> Iterable[Batch]:
    yield first
    yield from rest
