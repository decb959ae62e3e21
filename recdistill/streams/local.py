"""The local stream backend: append-only Arrow IPC segments on any fsspec path (the embedded default).

Layout (offsets in rows, zero-padded so names sort by offset):

    {root}/{name}/p={P}/{first:020d}.{rows}.{tmin}.{tmax}.arrow   one segment per append and partition
    {root}/{name}/_tmp/...                                          segments being written (readers ignore it)

A segment is written under `_tmp/` and then moved into place, so a reader lists only complete segments: a rename
is atomic on a local file system, and on object stores (s3, gcs) a PUT-then-copy publishes the whole object at
once. The event-time range in the name lets `seek(event_time_ms=...)` pick the segment by listing alone.

One producer per partition: the producer learns the next offset by listing when it opens, so two producers
appending to the same partition at once would race for a name. Consumer state is the committed offset per
partition; `state_dict()` hands it to the consumer's checkpoint (there is no server to keep it), and a consumer
restarted from that checkpoint reads everything after it again (at-least-once).
"""

from __future__ import annotations

import re
import time
import uuid

import fsspec
import numpy as np
import pyarrow as pa

from recdistill.streams.base import Cursor, Stream, StreamError, as_table, check_keys, column_np, split_by_partition

_SEG_RE = re.compile(r"(\d{20})\.(\d+)\.(-?\d+)\.(-?\d+)\.arrow$")


class LocalStream(Stream):
    """A stream of Arrow IPC segments under `{root}/{name}` (fsspec URI), `partitions` partitions.

    `poll_interval` is how often a blocking poll re-lists the partition directories while it waits.
    """

    def __init__(self, root: str, name: str, partitions: int = 1, poll_interval: float = 0.05) -> None:
        self.name, self.partitions, self.poll_interval = name, partitions, poll_interval
        self.fs, base = fsspec.core.url_to_fs(root)
        self.base = f"{base.rstrip('/')}/{name}"
        for p in range(partitions):
            self.fs.makedirs(self._pdir(p), exist_ok=True)
        self.fs.makedirs(f"{self.base}/_tmp", exist_ok=True)
        self._segments: dict[int, list[tuple[int, int, int, int, str]]] = {p: [] for p in range(partitions)}
        self._next_append: dict[int, int] | None = None
        self.committed = {p: 0 for p in range(partitions)}
        self.position = dict(self.committed)  # next offset to hand out, per partition
        self._rr = 0  # round-robin start partition of the next poll
        self._cache: dict[str, tuple[str, pa.Table]] = {}  # partition dir -> (path, table) of the last segment read

    def _pdir(self, p: int) -> str:
        return f"{self.base}/p={p}"

    # ---- listing -------------------------------------------------------------------------------------------------
    def _refresh(self, p: int) -> list[tuple[int, int, int, int, str]]:
        """Re-list partition p: (first offset, rows, tmin, tmax, path) of every published segment, by offset."""
        segs = []
        for path in self.fs.ls(self._pdir(p), detail=False):
            m = _SEG_RE.search(path)
            if m:
                segs.append((int(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4)), path))
        segs.sort()
        self._segments[p] = segs
        return segs

    def end_offset(self, p: int) -> int:
        """Rows published in partition p (offset one past the last row)."""
        segs = self._refresh(p)
        return segs[-1][0] + segs[-1][1] if segs else 0

    # ---- producer ------------------------------------------------------------------------------------------------
    def append(self, batch: pa.RecordBatch | pa.Table) -> int:
        """Publish the rows as one new segment per partition they fall in; returns the number of rows."""
        table = as_table(batch)
        check_keys(table, f"stream {self.name!r} append")
        if self._next_append is None:
            self._next_append = {p: self.end_offset(p) for p in range(self.partitions)}
        for p, part in split_by_partition(table, self.partitions):
            self._publish(p, part)
        return table.num_rows

    def _publish(self, p: int, part: pa.Table) -> None:
        first, rows = self._next_append[p], part.num_rows
        times = column_np(part, "event_time_ms")
        name = f"{first:020d}.{rows}.{int(times.min())}.{int(times.max())}.arrow"
        tmp = f"{self.base}/_tmp/{uuid.uuid4().hex}.arrow"
        # The IPC file format allows one dictionary per field: chunks of a dictionary column (teacher_version) must
        # share theirs.
        part = part.unify_dictionaries()
        sink = pa.BufferOutputStream()  # serialise in memory, then one write: the IPC writer makes a call per buffer
        with pa.ipc.new_file(sink, part.schema) as w:
            w.write_table(part)
        with self.fs.open(tmp, "wb") as f:
            f.write(sink.getvalue())
        self.fs.mv(tmp, f"{self._pdir(p)}/{name}")
        self._next_append[p] = first + rows

    # ---- consumer ------------------------------------------------------------------------------------------------
    def _read_from(self, p: int, offset: int, max_rows: int) -> pa.Table | None:
        """At most max_rows rows of partition p from `offset` (segments are sliced, never copied)."""
        segs = self._segments[p]
        if not segs or segs[-1][0] + segs[-1][1] <= offset:
            segs = self._refresh(p)
        parts, got = [], 0
        i = max(0, int(np.searchsorted([s[0] for s in segs], offset, side="right")) - 1)
        while i < len(segs) and got < max_rows:
            first, rows, _, _, path = segs[i]
            if first + rows > offset:
                table = self._load(path)
                start = max(0, offset - first)
                parts.append(table.slice(start, min(rows - start, max_rows - got)))
                got += parts[-1].num_rows
            i += 1
        return pa.concat_tables(parts) if parts else None

    def _load(self, path: str) -> pa.Table:
        # A poll that ends inside a segment leaves the rest for the next poll: keep the last segment read per
        # partition directory so it is not read and decoded twice.
        cached = self._cache.get(path.rsplit("/", 1)[0])
        if cached is not None and cached[0] == path:
            return cached[1]
        try:
            with self.fs.open(path, "rb") as f:
                table = pa.ipc.open_file(pa.BufferReader(f.read())).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise StreamError(f"stream {self.name!r}: segment {path} is unreadable ({e})") from e
        self._cache[path.rsplit("/", 1)[0]] = (path, table)
        return table

    def poll(self, max_rows: int, timeout: float = 0.0) -> tuple[pa.Table | None, Cursor]:
        """Rows after this consumer's position, partitions visited round-robin so none starves."""
        deadline = time.monotonic() + timeout
        while True:
            table, cursor = self._poll_once(max_rows)
            if table is not None or time.monotonic() >= deadline:
                return table, cursor
            time.sleep(min(self.poll_interval, max(0.0, deadline - time.monotonic())))

    def _poll_once(self, max_rows: int) -> tuple[pa.Table | None, Cursor]:
        cursor, parts = Cursor(), []
        for k in range(self.partitions):
            p = (self._rr + k) % self.partitions
            if cursor.rows >= max_rows:
                break
            part = self._read_from(p, self.position[p], max_rows - cursor.rows)
            if part is None or part.num_rows == 0:
                continue
            self.position[p] += part.num_rows
            cursor.positions[p] = self.position[p]
            cursor.rows += part.num_rows
            cursor.event_time_max[p] = int(column_np(part, "event_time_ms").max())
            parts.append(part)
        self._rr = (self._rr + 1) % self.partitions
        if not parts:
            return None, cursor
        return (parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="default")), cursor

    def commit(self, cursor: Cursor) -> None:
        """Record the cursor's offsets as committed (never moves a committed offset backwards)."""
        for p, off in cursor.positions.items():
            self.committed[p] = max(self.committed[p], int(off))

    def seek(self, *, offset: dict[int, int | str] | int | str | None = None, event_time_ms: int | None = None) -> None:
        """Move position and committed offset of every partition (by offset, or to an event time)."""
        if (offset is None) == (event_time_ms is None):
            raise ValueError("seek takes exactly one of offset and event_time_ms")
        if event_time_ms is not None:
            target = {p: self._offset_at(p, event_time_ms) for p in range(self.partitions)}
        elif isinstance(offset, dict):
            target = {p: int(offset.get(p, self.position[p])) for p in range(self.partitions)}
        else:
            target = {p: int(offset) for p in range(self.partitions)}
        self.position = dict(target)
        self.committed = dict(target)

    def _offset_at(self, p: int, t: int) -> int:
        """Offset of the first row of partition p with event time >= t (end of the partition if none)."""
        for first, _, _, tmax, path in self._refresh(p):
            if tmax >= t:
                times = column_np(self._load(path), "event_time_ms")
                return first + int(np.argmax(times >= t))
        return self.end_offset(p)

    def lag(self) -> int:
        """Rows published but not committed, over all partitions."""
        return sum(self.end_offset(p) - self.committed[p] for p in range(self.partitions))

    def state_dict(self) -> dict:
        """{"stream": name, "partitions": P, "committed": {partition: offset}} for the consumer's checkpoint."""
        return {"stream": self.name, "partitions": self.partitions,
                "committed": {str(p): o for p, o in self.committed.items()}}

    def state_after(self, cursors: list[Cursor]) -> dict:
        """The state with the cursors' offsets committed (this backend's offsets live only in the checkpoint)."""
        state = self.state_dict()
        for cur in cursors:
            for p, off in cur.positions.items():
                state["committed"][str(p)] = max(state["committed"][str(p)], int(off))
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume after the committed offsets of a checkpoint; uncommitted rows are delivered again."""
        if state.get("stream") != self.name or state.get("partitions") != self.partitions:
            raise StreamError(f"stream {self.name!r} ({self.partitions} partitions): checkpoint state is for "
                              f"{state.get('stream')!r} ({state.get('partitions')} partitions)")
        self.committed = {p: int(state["committed"].get(str(p), 0)) for p in range(self.partitions)}
        self.position = dict(self.committed)
