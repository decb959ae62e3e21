"""Checks of stream records on the consumer side: malformed rows are dead-lettered, the rest go on.

Delivery is at-least-once and producers are other programs (or other versions of this one), so a consumer cannot
trust what it reads: a row may lack a column, carry a null id, a NaN label, a traffic source the data does not
have, or logits of the wrong length. One such row must not stop training (issue 17: "malformed stream records get
a clear error with the record's id, are dead-lettered, and training goes on"). :class:`RecordCheck` tells each row
good or bad with the first reason that applies; :func:`split_malformed` hands the bad rows to
`Stream.dead_letter` (with their reasons), logs their ids and returns the good ones (:func:`dead_letter_all` does
the same for a whole table that does not fit). The bad rows' positions are
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
    a row with a signal needs `logits` with this many values (every row does when `has_signal` is off: the signal
    stream). known_ids: a mask function of the ids the consumer can use (the data source's `known_ids`).
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
        bad, why = self.check(table)
        out = np.full(table.num_rows, "", dtype=object)
        out[bad] = why
        return out

    def check(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(bad-row mask, the bad rows' reasons). Vectorised, with shortcuts for columns without nulls: the joiner
        runs it on every poll of tens of thousands of rows, where a per-row pass would cost more than the join."""
        n = table.num_rows
        code, whys = np.zeros(n, np.int16), [""]  # code k > 0: the row's first reason is whys[k]

        def flag(bad: np.ndarray | bool | None, why: str) -> None:
            if bad is None or bad is False:
                return
            new = (code == 0) if bad is True else (bad & (code == 0))
            if new.any():
                code[new] = len(whys)
                whys.append(why)

        schema = table.schema
        for name in [f.name for f in KEY_FIELDS] + list(self.required):
            typ = schema.field(name).type if name in schema.names else None
            if typ is None:
                flag(True, f"no column {name!r}")
            elif name in self.required or pa.types.is_integer(typ):
                flag(_nulls(table, name), f"null {name}")
            else:
                flag(True, f"column {name!r} is {typ}, expected int64")
        for name in self.labels:
            flag(*_not_finite(table, name))
        if self.traffic_sources is not None:
            if "traffic" not in schema.names or not pa.types.is_integer(schema.field("traffic").type):
                flag(True, "no integer column 'traffic'")
            else:
                t = _filled(table, "traffic", -1)
                flag((t < 0) | (t >= self.traffic_sources), f"traffic outside [0, {self.traffic_sources}) or null")
        with_signal: np.ndarray | bool = True
        if self.has_signal:
            if "has_signal" not in schema.names or not pa.types.is_boolean(schema.field("has_signal").type):
                flag(True, "no boolean column 'has_signal'")
                with_signal = False
            else:
                flag(_nulls(table, "has_signal"), "null has_signal")
                with_signal = _filled(table, "has_signal", False).astype(bool)
        if self.logits is not None:
            flag(*self._logits(table, with_signal))
        if self.known_ids is not None and "sample_id" in schema.names and pa.types.is_integer(
                schema.field("sample_id").type):
            flag(~np.asarray(self.known_ids(_filled(table, "sample_id", 0).astype(np.int64)), bool),
                 "sample_id outside the data source")
        bad = code > 0
        return bad, np.asarray(whys, dtype=object)[code[bad]]

    def _logits(self, table: pa.Table, need: np.ndarray | bool) -> tuple[np.ndarray | bool | None, str]:
        want, why = self.logits, f"logits missing or not {self.logits} values"
        if "logits" not in table.schema.names:
            return need, "no column 'logits'"
        typ = table.schema.field("logits").type
        if not (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)) or not (
                pa.types.is_floating(typ.value_type) or pa.types.is_integer(typ.value_type)):
            return need, f"column 'logits' is {typ}, expected a list of {want} floats"
        if pa.types.is_fixed_size_list(typ):
            if typ.list_size != want:  # every non-null row has the wrong length
                return (need | ~_nulls_mask(table, "logits")) if need is not True else True, why
            nulls = _nulls(table, "logits") if need is not False else None
            return (None if nulls is None else nulls if need is True else need & nulls), why
        lengths = pc.list_value_length(_combined(table, "logits")).fill_null(-1).to_numpy(zero_copy_only=False)
        # a row without a signal may carry null logits, not logits of another length
        return (lengths != want) & (need | (lengths != -1)), why


def _nulls(table: pa.Table, name: str) -> np.ndarray | None:
    """Mask of the column's nulls, None if it has none (the common case, answered from metadata)."""
    return _nulls_mask(table, name) if table.column(name).null_count else None


def _nulls_mask(table: pa.Table, name: str) -> np.ndarray:
    return _combined(table, name).is_null().to_numpy(zero_copy_only=False)


def _not_finite(table: pa.Table, name: str) -> tuple[np.ndarray | bool | None, str]:
    if name not in table.schema.names:
        return True, f"no column {name!r}"
    typ = table.schema.field(name).type
    why = f"{name} is null, NaN or infinite"
    if pa.types.is_floating(typ):
        return ~np.isfinite(table.column(name).to_numpy()), why  # nulls come out as NaN
    if pa.types.is_integer(typ) or pa.types.is_boolean(typ):
        return _nulls(table, name), why
    return True, f"column {name!r} is {typ}, not a number"


def _combined(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _filled(table: pa.Table, name: str, fill) -> np.ndarray:  # noqa: ANN001 - a scalar of the column's kind
    col = table.column(name)
    if col.null_count:
        col = col.fill_null(pa.scalar(fill, type=col.type))
    return col.to_numpy()


def split_malformed(table: pa.Table, check: RecordCheck, stream, where: str) -> tuple[pa.Table, int]:  # noqa: ANN001
    """(good rows, number dead-lettered): rows `check` finds bad go to `stream.dead_letter` (a Stream) with their
    reasons and are logged by sample id (`where` names the consumer in the log line)."""
    bad, why = check.check(table)
    if not bad.any():
        return table, 0
    _dead_letter(table.filter(pa.array(bad)), list(why), stream, where)
    return table.filter(pa.array(~bad)), int(bad.sum())


def dead_letter_all(table: pa.Table, reason: str, stream, where: str) -> int:  # noqa: ANN001 - stream: a Stream
    """Dead-letter every row of `table` for one `reason` (a table that does not fit as a whole), logged as
    `split_malformed` logs; returns the rows."""
    _dead_letter(table, [reason] * table.num_rows, stream, where)
    return table.num_rows


def _dead_letter(rows: pa.Table, why: list[str], stream, where: str) -> None:  # noqa: ANN001 - stream: a Stream
    stream.dead_letter(rows, why)
    ids = (_filled(rows, "sample_id", -1).tolist() if "sample_id" in rows.column_names and
           pa.types.is_integer(rows.schema.field("sample_id").type) else ["?"] * rows.num_rows)
    shown = "; ".join(f"sample_id {i}: {r}" for i, r in zip(ids[:SHOW_IDS], why[:SHOW_IDS], strict=False))
    more = f" (and {len(ids) - SHOW_IDS} more)" if len(ids) > SHOW_IDS else ""
    log.warning("%s: stream %r: %d malformed record(s) dead-lettered: %s%s", where, stream.name, len(ids), shown, more)
