"""Checks of stream records on the consumer side: malformed rows are dead-lettered, the rest go on.

Delivery is at-least-once and producers are other programs (or other versions of this one), so a consumer cannot
trust what it reads: a row may lack a column, carry a null id, a NaN label, a traffic source the data does not
have, or logits of the wrong length. One such row must not stop training (issue 17: "malformed stream records get
a clear error with the record's id, are dead-lettered, and training goes on"). :class:`RecordCheck` tells each row
good or bad with the first reason that applies; :func:`split_malformed` hands the bad rows to
`Stream.dead_letter` (with their reasons), logs their ids and returns the good ones. The bad rows' positions are
committed with the rest of the poll, so they are not delivered again once the consumer's checkpoint holds the poll
(a consumer that dies before that dead-letters them a second time: the dead letters are at-least-once too).

What is *not* malformed: NaN or infinite teacher logits. They are the teacher's garbage, not the stream's; they
pass here and the student rejects and counts them as in the batch phase (DESIGN §4 'Losses').
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recdistill.streams.base import KEY_FIELDS

log = logging.getLogger(__name__)
SHOW_IDS = 5  # ids named in one log line; the dead-letter store has them all


@dataclass
class RecordCheck:
    """What a consumer needs of a row.

    labels: `label_<task>` columns that must be finite numbers. traffic_sources: when set, `traffic` must be an
    integer in [0, traffic_sources). has_signal: the joined stream's flag must be there, non-null. logits: when set,
    a row with a signal (or every row, on the signal stream: `has_signal` false) needs `logits` with this many
    values. known_ids: a mask function of the ids the consumer can use (the data source's `known_ids`).
    required: more columns that must be there (any type), without nulls.
    """

    labels: list[str] = field(default_factory=list)
    traffic_sources: int | None = None
    has_signal: bool = False
    logits: int | None = None
    known_ids: Callable[[np.ndarray], np.ndarray] | None = None
    required: list[str] = field(default_factory=list)

    def __call__(self, table: pa.Table) -> np.ndarray:
        """Reason per row ("" for a good row), as an object array."""
        n = table.num_rows
        reasons = np.full(n, "", dtype=object)

        def flag(bad: np.ndarray, why: str) -> None:
            reasons[bad & (reasons == "")] = why

        names = set(table.column_names)
        for f in KEY_FIELDS:
            if f.name not in names:
                flag(np.ones(n, bool), f"no column {f.name!r}")
            elif not pa.types.is_integer(table.schema.field(f.name).type):
                flag(np.ones(n, bool), f"column {f.name!r} is {table.schema.field(f.name).type}, expected int64")
            else:
                flag(_null(table, f.name), f"null {f.name}")
        for name in self.required:
            if name not in names:
                flag(np.ones(n, bool), f"no column {name!r}")
            else:
                flag(_null(table, name), f"null {name}")
        for name in self.labels:
            flag(*self._finite(table, name, names))
        if self.traffic_sources is not None:
            if "traffic" not in names or not pa.types.is_integer(table.schema.field("traffic").type):
                flag(np.ones(n, bool), "no integer column 'traffic'")
            else:
                t = _filled(table, "traffic", -1).astype(np.int64)
                flag((t < 0) | (t >= self.traffic_sources),
                     f"traffic outside [0, {self.traffic_sources}) or null")
        with_signal = np.ones(n, bool)
        if self.has_signal:
            if "has_signal" not in names or not pa.types.is_boolean(table.schema.field("has_signal").type):
                flag(np.ones(n, bool), "no boolean column 'has_signal'")
                with_signal[:] = False
            else:
                flag(_null(table, "has_signal"), "null has_signal")
                with_signal = _filled(table, "has_signal", False).astype(bool)
        if self.logits is not None:
            flag(*self._logits(table, names, with_signal))
        if self.known_ids is not None and "sample_id" in names:
            ok = reasons == ""
            if ok.any():
                ids = _filled(table, "sample_id", 0).astype(np.int64)
                unknown = np.zeros(n, bool)
                unknown[ok] = ~np.asarray(self.known_ids(ids[ok]), bool)
                flag(unknown, "sample_id outside the data source")
        return reasons

    @staticmethod
    def _finite(table: pa.Table, name: str, names: set[str]) -> tuple[np.ndarray, str]:
        n = table.num_rows
        if name not in names:
            return np.ones(n, bool), f"no column {name!r}"
        typ = table.schema.field(name).type
        if not (pa.types.is_floating(typ) or pa.types.is_integer(typ) or pa.types.is_boolean(typ)):
            return np.ones(n, bool), f"column {name!r} is {typ}, not a number"
        v = pc.cast(_combined(table, name), pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
        return ~np.isfinite(v), f"{name} is null, NaN or infinite"

    def _logits(self, table: pa.Table, names: set[str], need: np.ndarray) -> tuple[np.ndarray, str]:
        want = self.logits
        if "logits" not in names:
            return need.copy(), "no column 'logits'"
        col = _combined(table, "logits")
        if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
                or pa.types.is_fixed_size_list(col.type)) or not (
                pa.types.is_floating(col.type.value_type) or pa.types.is_integer(col.type.value_type)):
            return need.copy(), f"column 'logits' is {col.type}, expected a list of {want} floats"
        if pa.types.is_fixed_size_list(col.type):
            lengths = np.where(col.is_null().to_numpy(zero_copy_only=False), -1, col.type.list_size)
        else:
            lengths = pc.list_value_length(col).fill_null(-1).to_numpy(zero_copy_only=False)
        # a row without a signal may carry null logits, not logits of another length
        return (lengths != want) & (need | (lengths != -1)), f"logits missing or not {want} values"


def _combined(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _null(table: pa.Table, name: str) -> np.ndarray:
    return _combined(table, name).is_null().to_numpy(zero_copy_only=False)


def _filled(table: pa.Table, name: str, fill) -> np.ndarray:  # noqa: ANN001 - a scalar of the column's kind
    col = _combined(table, name)
    if col.null_count:
        col = col.fill_null(pa.scalar(fill, type=col.type))
    return col.to_numpy(zero_copy_only=False)


def split_malformed(table: pa.Table, check: Callable[[pa.Table], np.ndarray], stream, where: str
                    ) -> tuple[pa.Table, int]:  # noqa: ANN001 - stream: a Stream
    """(good rows, number dead-lettered): rows `check` (a RecordCheck, or any function giving a reason per row) finds
    bad go to `stream.dead_letter` with their reasons and
    are logged by sample id (`where` names the consumer in the log line)."""
    reasons = check(table)
    bad = reasons != ""
    if not bad.any():
        return table, 0
    rows, why = table.filter(pa.array(bad)), reasons[bad]
    stream.dead_letter(rows, list(why))
    ids = (_filled(rows, "sample_id", -1).tolist() if "sample_id" in rows.column_names and
           pa.types.is_integer(rows.schema.field("sample_id").type) else ["?"] * rows.num_rows)
    shown = "; ".join(f"sample_id {i}: {r}" for i, r in zip(ids[:SHOW_IDS], why[:SHOW_IDS], strict=False))
    more = f" (and {len(ids) - SHOW_IDS} more)" if len(ids) > SHOW_IDS else ""
    log.warning("%s: stream %r: %d malformed record(s) dead-lettered: %s%s", where, stream.name, len(ids), shown, more)
    return table.filter(pa.array(~bad)), int(bad.sum())
