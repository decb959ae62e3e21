"""The stream interface and its record schemas (DESIGN §4 'Streams').

A stream is a named, partitioned, append-only log of Arrow record batches keyed by `sample_id`. Every record
carries three key columns:

    sample_id      int64   the join key (DESIGN §4 'Sample identity')
    event_time_ms  int64   when the sample happened, milliseconds since the epoch (the joiner's watermark clock)
    seq            int64   the producer's own sequence number (its position in its source: a producer that
                           restarts, or that finds a server lost its last second of writes, re-sends from there)

Three kinds of records are defined here: the *sample* stream (key columns, `day`, `traffic`, `label_<task>`), the
*teacher-signal* stream (key columns, raw `logits`, `teacher_step`, `teacher_version`) and the *joined* stream the
joiner publishes (the sample columns, then the signal columns, null where no signal came in time, and
`has_signal`). A joined record is everything a student batch needs: the features are a deterministic function of the
sample id (synthetic world) or are looked up by it, and the labels and teacher logits (or their absence) ride along.

Delivery is at-least-once. Where duplicates are dropped: the joiner drops duplicate samples and duplicate signals
on its inputs (by sample id); a student consuming the joined stream drops re-deliveries with a
:class:`DuplicateFilter` of its own (a redelivery after a crash before commit brings rows the joiner had already
published).

Consumer protocol: `poll` hands out the next rows and a :class:`Cursor`; nothing is acknowledged until the consumer
calls `commit(cursor)`, which it does once its own checkpoint holds the step that consumed those rows. A consumer
that dies before that gets the rows again. Offsets are per partition; `state_dict()` is what a student checkpoint
stores beside its weights.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from recdistill.errors import RecdistillError

log = logging.getLogger(__name__)

KEY_FIELDS = (pa.field("sample_id", pa.int64(), nullable=False),
              pa.field("event_time_ms", pa.int64(), nullable=False),
              pa.field("seq", pa.int64(), nullable=False))
SIGNAL_COLUMNS = ("logits", "teacher_step", "teacher_version")


class StreamError(RecdistillError, RuntimeError):
    """A stream is unusable or a record in it is malformed; the message names the stream and the entry."""

    fix = "check the stream settings (stream.backend, stream.path, stream.redis_url) and the producer"


def sample_schema(tasks: list[str]) -> pa.Schema:
    """Schema of the sample stream: key columns, day, traffic source and one float32 label per task."""
    return pa.schema([*KEY_FIELDS, pa.field("day", pa.int32()), pa.field("traffic", pa.int32()),
                      *[pa.field(f"label_{t}", pa.float32()) for t in tasks]])


VERSION_TYPE = pa.dictionary(pa.int32(), pa.string())


def signal_schema(num_tasks: int) -> pa.Schema:
    """Schema of the teacher-signal stream: key columns (event time = the sample's), raw logits, step, version.

    `teacher_version` is dictionary-encoded: one teacher writes one version for millions of rows, and the joiner's
    takes then move int32 indices instead of strings."""
    return pa.schema([*KEY_FIELDS, pa.field("logits", pa.list_(pa.float32(), num_tasks)),
                      pa.field("teacher_step", pa.int64()), pa.field("teacher_version", VERSION_TYPE)])


def version_column(version: str, n: int) -> pa.DictionaryArray:
    """A `teacher_version` column of n rows of one version."""
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([version]))


def joined_schema(samples: pa.Schema, num_tasks: int) -> pa.Schema:
    """Schema of the joined stream: every sample column, the signal columns (nullable) and `has_signal`."""
    sig = signal_schema(num_tasks)
    return pa.schema([*samples, *[sig.field(c).with_nullable(True) for c in SIGNAL_COLUMNS],
                      pa.field("has_signal", pa.bool_(), nullable=False)])


def check_keys(batch: pa.RecordBatch | pa.Table, where: str) -> None:
    """Raise StreamError naming `where` unless `batch` has the three key columns as non-null int64."""
    for f in KEY_FIELDS:
        idx = batch.schema.get_field_index(f.name)
        if idx < 0:
            raise StreamError(f"{where}: record has no column {f.name!r} (has {batch.schema.names})")
        col = batch.column(idx)
        if col.type != pa.int64():
            raise StreamError(f"{where}: column {f.name!r} is {col.type}, expected int64")
        if col.null_count:
            raise StreamError(f"{where}: column {f.name!r} has {col.null_count} nulls")


def column_np(batch: pa.RecordBatch | pa.Table, name: str) -> np.ndarray:
    """A fixed-width column as a numpy array (zero-copy where Arrow allows)."""
    col = batch.column(name)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.to_numpy(zero_copy_only=False)


@dataclass
class Cursor:
    """What a poll handed out, to be passed back to `commit`.

    positions: partition -> backend position after the polled rows (local: row offset; redis: last entry id).
    rows: rows handed out. event_time_max: partition -> largest event time among the rows of that partition (the
    joiner's watermark input). acks: backend-private handles (redis: (stream key, entry id, rows) to XACK).
    caught_up: the poll read every partition to its end (nothing more was there when it looked): the consumer has
    no backlog. False when unsure (redis: re-reading pending or claimed entries).
    """

    positions: dict[int, int | str] = field(default_factory=dict)
    rows: int = 0
    event_time_max: dict[int, int] = field(default_factory=dict)
    acks: list = field(default_factory=list)
    caught_up: bool = False

    @property
    def empty(self) -> bool:
        """True when the poll returned nothing."""
        return self.rows == 0 and not self.acks


class Stream(abc.ABC):
    """A partitioned append-only stream seen by one producer and/or one consumer (group member).

    Rows are routed to partition `sample_id % partitions`, so two streams with the same partition count are
    co-partitioned by sample id (Kafka's layout; docs/STREAMS.md).
    """

    name: str
    partitions: int
    dead_rows: int = 0  # rows this object's backend put aside itself (unreadable, wrong schema, poison), this process
    seen_schema: pa.Schema | None = None  # schema of the rows polled so far: what a conflicting table is told from

    @abc.abstractmethod
    def append(self, batch: pa.RecordBatch | pa.Table) -> int:
        """Append rows (they must carry the key columns); returns the number of rows appended. Durable on return
        as far as the backend promises (local: published segment; redis: within `appendfsync everysec`)."""

    @abc.abstractmethod
    def poll(self, max_rows: int, timeout: float = 0.0) -> tuple[pa.Table | None, Cursor]:
        """Up to about `max_rows` rows not yet handed to this consumer (None if none came within `timeout`
        seconds), and the cursor to commit once they are safely consumed. The local backend returns at most
        `max_rows`; redis returns whole entries and may exceed it by up to one entry per partition."""

    @abc.abstractmethod
    def commit(self, cursor: Cursor) -> None:
        """Acknowledge everything the cursor covers: it is not delivered again to this consumer group."""

    @abc.abstractmethod
    def seek(self, *, offset: dict[int, int | str] | int | str | None = None, event_time_ms: int | None = None) -> None:
        """Move the read position: to a backend position (per partition, or one for all) or to the first row whose
        event time is >= `event_time_ms` (event times are assumed non-decreasing within a partition). Rows handed out
        before and not committed are forgotten by this consumer."""

    @abc.abstractmethod
    def lag(self) -> int:
        """Rows appended but not yet committed by this consumer (group)."""

    def dead_letter(self, rows: pa.Table, reasons: list[str]) -> None:
        """Put malformed rows aside with why (one reason per row) in the backend's dead-letter place, where
        `dead_letters()` finds them. It acknowledges nothing: the caller commits their positions with the rest of the
        poll that brought them (recdistill/streams/validate.py)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no dead letters")

    def dead_letters(self) -> list[dict]:
        """What was dead-lettered, oldest first: dicts with `where` (entry, segment or consumer), `reason` and `rows`
        (a table with a `dead_reason` column; None where the payload could not be decoded)."""
        return []

    def state_dict(self) -> dict:
        """The consumer's committed position, small JSON-able state for a checkpoint."""
        return {}

    def state_after(self, cursors: list[Cursor]) -> dict:
        """The `state_dict()` this consumer will have once `cursors` are committed: what a checkpoint taken before
        the commit stores (the commit follows the checkpoint). Default: the current one (a backend whose position
        lives in the server, such as redis, keeps only names)."""
        return self.state_dict()

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 (optional hook: a stateless backend keeps it)
        """Restore a position saved by `state_dict` (rows after it are delivered again)."""

    def close(self) -> None:  # noqa: B027 (optional hook: nothing to release by default)
        """Release connections and files."""

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


REASON_COLUMN = "dead_reason"


def with_reasons(rows: pa.Table, reasons: list[str]) -> pa.Table:
    """`rows` with a string column `dead_reason` appended (the dead-letter payload)."""
    return as_table(rows).append_column(REASON_COLUMN, pa.array(list(reasons), pa.string()))


def ipc_file_bytes(table: pa.Table) -> bytes:
    """Arrow IPC file bytes of a table (dictionaries unified: the file format allows one per field)."""
    sink = pa.BufferOutputStream()
    table = table.unify_dictionaries()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def concat_compatible(stream: Stream, tables: list[tuple[pa.Table, str]]) -> pa.Table | None:
    """The tables of one poll as one (schemas unified permissively: a missing column becomes nulls, float32 meets
    float64); a table whose schema cannot join the stream's so far (`stream.seen_schema`: a column of another
    type) is dead-lettered with the reason, naming `where` (its entry or segment), instead of failing the poll.
    None if nothing is left."""
    if not tables:
        return None
    schemas = [s for s in (stream.seen_schema,) if s is not None] + [t.schema for t, _ in tables]
    try:
        stream.seen_schema = pa.unify_schemas(schemas, promote_options="permissive") if len(schemas) > 1 \
            else schemas[0]
        return pa.concat_tables([t for t, _ in tables], promote_options="permissive") if len(tables) > 1 \
            else tables[0][0]
    except (pa.ArrowInvalid, pa.ArrowTypeError, NotImplementedError):
        pass
    keep, schema = [], stream.seen_schema
    for t, where in tables:
        try:
            schema = t.schema if schema is None else pa.unify_schemas([schema, t.schema],
                                                                      promote_options="permissive")
            keep.append(t)
            stream.seen_schema = schema
        except (pa.ArrowInvalid, pa.ArrowTypeError, NotImplementedError) as e:
            stream.dead_letter(t, [f"{where}: schema does not fit the stream's ({e})"] * t.num_rows)
            stream.dead_rows += t.num_rows
            log.warning("stream %s: %s dead-lettered: schema does not fit the stream's (%s)", stream.name, where, e)
    return pa.concat_tables(keep, promote_options="permissive") if keep else None


def partition_of(sample_id: np.ndarray, partitions: int) -> np.ndarray:
    """Partition of each row: sample_id mod partitions (non-negative for negative ids too)."""
    return np.mod(sample_id, partitions)


def split_by_partition(batch: pa.Table, partitions: int) -> list[tuple[int, pa.Table]]:
    """The rows of `batch` grouped by partition, order kept inside each group."""
    if partitions == 1:
        return [(0, batch)]
    part = partition_of(column_np(batch, "sample_id"), partitions)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    return [(p, batch.take(order[bounds[p]:bounds[p + 1]])) for p in range(partitions) if bounds[p + 1] > bounds[p]]


def as_table(batch: pa.RecordBatch | pa.Table) -> pa.Table:
    """A record batch or table as a table."""
    return pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch


class IdWindow:
    """Sample ids seen recently, in bounded memory: a set with vectorised lookups and eviction by event time.

    Ids are kept in sorted chunks, each tagged with the largest event time among its rows; `evict(before)` drops
    chunks whose rows are all older than `before` (the caller passes watermark minus its dedup horizon). A lookup is
    one `np.searchsorted` per chunk; chunks are merged when there are more than `max_chunks`, the newer half into
    one, so older chunks can still be evicted whole.
    """

    def __init__(self, max_chunks: int = 8) -> None:
        self.max_chunks = max_chunks
        self._chunks: list[tuple[np.ndarray, int]] = []  # (sorted ids, max event time)

    def __len__(self) -> int:
        return sum(len(c[0]) for c in self._chunks)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Mask of the ids held (sorted queries are faster: the binary searches stay in cache)."""
        out = np.zeros(len(ids), bool)
        for keys, _ in self._chunks:
            pos = np.searchsorted(keys, ids)
            np.minimum(pos, len(keys) - 1, out=pos)
            out |= keys[pos] == ids
        return out

    def add(self, ids: np.ndarray, event_time_ms: np.ndarray, is_sorted: bool = False) -> None:
        """Remember ids (the caller has checked they are not held yet)."""
        if not len(ids):
            return
        self._chunks.append((ids if is_sorted else np.sort(ids), int(event_time_ms.max())))
        if len(self._chunks) > self.max_chunks:
            keep = self.max_chunks // 2
            old, new = self._chunks[:keep], self._chunks[keep:]
            self._chunks = [*old, (np.sort(np.concatenate([c[0] for c in new])), max(c[1] for c in new))]

    def evict(self, before_ms: int) -> None:
        """Forget chunks whose newest row is older than `before_ms`."""
        self._chunks = [c for c in self._chunks if c[1] >= before_ms]


def first_unseen(ids: np.ndarray, seen: IdWindow, *, first: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(keep, sorted kept ids): keep marks one occurrence of each id not in `seen`: the first in input order if
    `first`, else any (an unstable sort is about a third faster, and any copy of a re-delivered record will do)."""
    order = np.argsort(ids, kind="stable" if first else None)
    sid = ids[order]
    keep_sorted = np.ones(len(ids), bool)
    keep_sorted[1:] = sid[1:] != sid[:-1]
    keep_sorted &= ~seen.contains(sid)
    keep = np.empty(len(ids), bool)
    keep[order] = keep_sorted
    return keep, sid[keep_sorted]


class DuplicateFilter:
    """Drops rows whose sample id was already passed within the last `horizon_ms` of event time.

    What a consumer of an at-least-once stream (a student on the joined stream) puts in front of its training step.
    The first occurrence in stream order wins. That matters on the joined stream: after a joiner crash a sample can
    go out twice, first joined (before the crash) and then label-only (its signal's input was committed, its sample's
    not), and the first copy is the one with the signal.
    """

    def __init__(self, horizon_ms: int) -> None:
        self.horizon_ms = horizon_ms
        self.seen = IdWindow()
        self.dropped = 0
        self._latest: int | None = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The rows of `batch` not seen before (first occurrence kept); updates the window."""
        ids, times = column_np(batch, "sample_id"), column_np(batch, "event_time_ms")
        keep, kept_sorted = first_unseen(ids, self.seen)
        self.dropped += int(len(ids) - len(kept_sorted))
        if len(kept_sorted):
            self.seen.add(kept_sorted, times[keep], is_sorted=True)
            self._latest = max(self._latest or 0, int(times[keep].max()))
            self.seen.evict(self._latest - self.horizon_ms)
        return batch if keep.all() else batch.filter(pa.array(keep))

    def state_dict(self) -> dict[str, np.ndarray]:
        """The ids remembered (one array per chunk, `ids{k}`), each chunk's newest event time, the drop count: numpy
        arrays for a checkpoint, so a consumer restarted from it still drops re-deliveries of what it trained."""
        chunks = self.seen._chunks
        return {"tmax": np.array([c[1] for c in chunks], np.int64),
                "meta": np.array([self.dropped, -1 if self._latest is None else self._latest], np.int64),
                **{f"ids{k}": c[0] for k, c in enumerate(chunks)}}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what `state_dict` saved."""
        self.seen._chunks = [(np.asarray(state[f"ids{k}"]), int(t)) for k, t in enumerate(state["tmax"])]
        self.dropped, latest = (int(x) for x in state["meta"])
        self._latest = None if latest < 0 else latest


def poll_new_rows(stream: Stream, max_rows: int, timeout: float, dedup: DuplicateFilter, counts, uncommitted: list,
                  validate: Callable[[pa.Table], pa.Table] | None = None
                  ) -> tuple[pa.Table | None, Cursor]:  # noqa: ANN001 - counts: anything with polled / redelivered
    """One poll of an at-least-once stream by a consumer: the cursor goes to `uncommitted` (committed once the
    consumer's checkpoint holds the rows), `validate` (if given) takes the malformed rows out, re-deliveries are
    dropped by `dedup`, `counts.polled` and `counts.redelivered` count both. Returns (the new rows or None, the
    cursor). Validation comes before dedup: a malformed copy must not hide a good re-delivery of the same id."""
    table, cursor = stream.poll(max_rows, timeout)
    if cursor.empty:
        return None, cursor
    uncommitted.append(cursor)
    if table is None or not table.num_rows:
        return None, cursor
    counts.polled += table.num_rows
    if validate is not None:
        table = validate(table)
        if not table.num_rows:
            return None, cursor
    before = dedup.dropped
    table = dedup(table)
    counts.redelivered += dedup.dropped - before
    return table, cursor
