"""Row-level checks of a Parquet directory: every fault a training run would meet only when it reaches the row.

    faults = row_faults(ParquetSource(DIR))              # every row (`recdistill data inspect DIR --check-rows`)
    faults = row_faults(src, rows_per_file=1024)         # a cheap sample: the first rows of each file

Opening a ParquetSource already checks column names, types, metadata and sample-id uniqueness; what it leaves to
the reader (decoding every history up front would cost as much as an epoch) is checked here: null labels or ids,
unequal hist_* lists within a row, ids outside [0, cardinality) (negative included), traffic ids outside
[0, num_traffic), binary labels other than 0/1. Each fault names the file, the column and sample ids of rows that
have it, so the user can find them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recdistill.data.parquet import ParquetSource

#: Rows decoded at a time when every row is checked (bounds memory with long histories).
BATCH_ROWS = 8192
#: Sample ids shown per fault.
SHOWN = 3


@dataclass
class Fault:
    """One kind of fault in one column of one file: how many rows have it and the sample ids of the first few."""

    file: str
    column: str
    problem: str
    rows: int
    sample_ids: list

    def __str__(self) -> str:
        ids = ", ".join(map(str, self.sample_ids)) + (", ..." if self.rows > len(self.sample_ids) else "")
        return f"{self.file}: column '{self.column}' {self.problem} in {self.rows} row(s) (sample_id {ids})"


def row_faults(src: ParquetSource, rows_per_file: int | None = None) -> list[Fault]:
    """Faults of every row (`rows_per_file` None) or of the first `rows_per_file` rows of each file, merged per
    (file, column, problem)."""
    out: dict[tuple[str, str, str], Fault] = {}
    for f in src.files:
        with src.fs.open(f, "rb") as fh:
            pf = pq.ParquetFile(fh)
            size = BATCH_ROWS if rows_per_file is None else max(1, min(rows_per_file, BATCH_ROWS))
            seen = 0
            for batch in pf.iter_batches(batch_size=size):
                if rows_per_file is not None:
                    batch = batch.slice(0, rows_per_file - seen)
                for fault in _batch_faults(pa.Table.from_batches([batch]), f, src, seen):
                    key = (fault.file, fault.column, fault.problem)
                    if key in out:
                        out[key].rows += fault.rows
                        out[key].sample_ids = (out[key].sample_ids + fault.sample_ids)[:SHOWN]
                    else:
                        out[key] = fault
                seen += batch.num_rows
                if rows_per_file is not None and seen >= rows_per_file:
                    break
    return list(out.values())


def _per_row(arr: pa.Array, values_bad: np.ndarray) -> np.ndarray:
    """Rows of a list column with at least one flattened value marked in `values_bad`."""
    parents = pc.list_parent_indices(arr).to_numpy()
    out = np.zeros(len(arr), dtype=bool)
    out[parents[values_bad]] = True
    return out


def _id_checks(t: pa.Table, col: str, card: int) -> list[tuple[str, str, np.ndarray]]:
    """(column, problem, bad rows) for null ids and ids outside [0, card) of an int64 or list<int64> column."""
    arr = t.column(col).combine_chunks()
    is_list = pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)
    flat = pc.list_flatten(arr) if is_list else arr
    nulls = flat.is_null().to_numpy(zero_copy_only=False)
    values = pc.fill_null(flat, 0).to_numpy().astype(np.int64)
    out_of_range = (values < 0) | (values >= card)
    if is_list:
        return [(col, "has a null id inside its list", _per_row(arr, nulls)),
                (col, f"has an id outside [0, {card})", _per_row(arr, out_of_range & ~nulls))]
    return [(col, "has a null value", nulls), (col, f"has an id outside [0, {card})", out_of_range & ~nulls)]


def _checks(t: pa.Table, src: ParquetSource) -> list[tuple[str, str, np.ndarray]]:
    """(column, problem, bad rows) of every check on the rows of `t`."""
    s, out = src.schema, []
    for col in ["sample_id", "day", *(f"label_{x.name}" for x in s.tasks), *(f"dense_{d}" for d in s.dense)]:
        out.append((col, "has a null value", t.column(col).is_null().to_numpy(zero_copy_only=False)))
    for x in s.tasks:
        if x.kind == "binary":
            y = t.column(f"label_{x.name}")
            bad = pc.fill_null(pc.invert(pc.is_in(y, pa.array([0.0, 1.0], y.type))), False)
            out.append((f"label_{x.name}", "has a binary label other than 0/1", bad.to_numpy()))
    out += _id_checks(t, "traffic", s.num_traffic)
    for k, card in s.sparse.items():
        out += _id_checks(t, f"sparse_{k}", card)
    lengths = {}
    for k, card in s.history.items():
        out += _id_checks(t, f"hist_{k}", card)
        lengths[k] = pc.fill_null(pc.list_value_length(t.column(f"hist_{k}")), 0).to_numpy()  # null list = empty
    out += [(f"hist_{k}", "has a different length than 'hist_item'", n != lengths["item"])
            for k, n in lengths.items() if k != "item"]
    return out


def _batch_faults(t: pa.Table, f: str, src: ParquetSource, first_row: int) -> list[Fault]:
    """Every fault of the rows of `t`, rows first_row.. of file `f`."""
    out = []
    for col, problem, bad in _checks(t, src):
        rows = np.flatnonzero(bad)
        if len(rows):
            ids = [t.column("sample_id")[int(r)].as_py() for r in rows[:SHOWN]]
            out.append(Fault(f, col, problem, len(rows), [f"<null> (row {first_row + r})" if i is None else i
                                                           for i, r in zip(ids, rows[:SHOWN], strict=True)]))
    return out
