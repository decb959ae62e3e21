"""The local stream backend: append-only Arrow IPC segments on any fsspec path (the embedded default).

Layout (offsets in rows, zero-padded so names sort by offset):

    {root}/{name}/p={P}/{first:020d}.{rows}.{tmin}.{tmax}.arrow   one segment per append and partition
    {root}/{name}/_tmp/...                                          segments being written (readers ignore it)
    {root}/{name}/_dead/{ns}.{uid}.json + .arrow | .bin            dead letters: why (JSON, written last) and what

A segment is written under `_tmp/` and then moved into place, so a reader lists only complete segments: a rename
is atomic on a local file system, and on object stores (s3, gcs) a PUT-then-copy publishes the whole object at
once. The event-time range in the name lets `seek(event_time_ms=...)` pick the segment by listing alone.

One producer per partition: the producer learns the next offset by listing when it opens, so two producers
appending to the same partition at once would race for a name. Consumer state is the committed offset per
partition; `state_dict()` hands it to the consumer's checkpoint (there is no server to keep it), and a consumer
restarted from that checkpoint reads everything after it again (at-least-once).

Dead letters: a segment that cannot be read (truncated, bit rot) is copied to `_dead/` with the reason and skipped,
its rows counted as consumed; malformed rows a consumer finds (`dead_letter`) go there too, as an Arrow file with a
`dead_reason` column. Consumption goes on either way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid

import fsspec
import numpy as np
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from recdistill.streams.base import (
    Cursor,
    Stream,
    StreamError,
    as_table,
    check_keys,
    column_np,
    concat_compatible,
    ipc_file_bytes,
    split_by_partition,
    with_reasons,
)

log = logging.getLogger(__name__)
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
        self._parsed: dict[int, dict[str, tuple | None]] = {}  # partition -> listed path -> parsed segment (or None)
        self._local = isinstance(self.fs, LocalFileSystem)

    def _pdir(self, p: int) -> str:
        return f"{self.base}/p={p}"

    # ---- listing -------------------------------------------------------------------------------------------------
    def _refresh(self, p: int) -> list[tuple[int, int, int, int, str]]:
        """Re-list partition p: (first offset, rows, tmin, tmax, path) of every published segment, by offset.

        A live consumer lists every poll, and a partition gains a segment per append, so the cost of a listing is
        what grows: only names not seen before are parsed, and a local directory is read with os.listdir (fsspec's
        `ls` costs several times more per entry, which at a thousand segments was milliseconds of every poll)."""
        pdir = self._pdir(p)
        if self._local:
            paths = [f"{pdir}/{n}" for n in os.listdir(pdir)]
        else:
            paths = self.fs.ls(pdir, detail=False)
        known = self._parsed.setdefault(p, {})
        new = [path for path in paths if path not in known]  # segments are never removed: only new names matter
        for path in new:
            m = _SEG_RE.search(path)
            known[path] = (int(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4)), path) if m else None
        if new or not self._segments[p]:
            self._segments[p] = sorted(s for s in known.values() if s is not None)
        return self._segments[p]

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
    def _read_from(self, p: int, offset: int, max_rows: int) -> tuple[pa.Table | None, int]:
        """At most max_rows rows of partition p from `offset` (segments are sliced, never copied), and the rows
        consumed: those returned plus those of unreadable segments, dead-lettered and skipped."""
        segs = self._segments[p]
        if not segs or segs[-1][0] + segs[-1][1] <= offset:
            segs = self._refresh(p)
            listed = True
        else:
            listed = False
        parts, got, consumed = [], 0, 0
        i = max(0, int(np.searchsorted([s[0] for s in segs], offset, side="right")) - 1)
        while got < max_rows:
            if i >= len(segs):
                if listed:  # read to the end of a fresh listing: nothing more is there now
                    break
                # read to the end of what was listed: list again, so a poll that returns fewer than max_rows has
                # seen everything published (Cursor.caught_up)
                segs, listed = self._refresh(p), True
                if i >= len(segs):
                    break
            first, rows, _, _, path = segs[i]
            if first + rows > offset:
                start = max(0, offset - first)
                table = self._load_or_dead_letter(path)
                if table is None:
                    consumed += rows - start
                else:
                    parts.append((table.slice(start, min(rows - start, max_rows - got)), path))
                    got += parts[-1][0].num_rows
                    consumed += parts[-1][0].num_rows
            i += 1
        return concat_compatible(self, parts), consumed

    def _load_or_dead_letter(self, path: str) -> pa.Table | None:
        """The segment's rows, or None after dead-lettering a segment that cannot be read or lacks the key columns
        (its rows are skipped: consumption goes on)."""
        try:
            table = self._load(path)
            check_keys(table, f"stream {self.name!r}: segment {path}")
            return table
        except StreamError as e:
            with self.fs.open(path, "rb") as f:
                raw = f.read()
            self._write_dead(raw, "bin", {"where": path, "reason": str(e)})
            m = _SEG_RE.search(path)
            self.dead_rows += int(m.group(2)) if m else 0
            log.warning("stream %s: segment %s dead-lettered and skipped: %s", self.name, path, e)
            return None

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
            part, consumed = self._read_from(p, self.position[p], max_rows - cursor.rows)
            self.position[p] += consumed
            if consumed:  # dead-lettered segments move the position too
                cursor.positions[p] = self.position[p]
            if part is None or part.num_rows == 0:
                continue
            cursor.rows += part.num_rows
            cursor.event_time_max[p] = int(column_np(part, "event_time_ms").max())
            parts.append((part, f"partition {p}"))
        self._rr = (self._rr + 1) % self.partitions
        cursor.caught_up = cursor.rows < max_rows  # every partition was read to the end of a fresh listing
        return concat_compatible(self, parts), cursor

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

    # ---- dead letters --------------------------------------------------------------------------------------------
    def dead_letter(self, rows: pa.Table, reasons: list[str]) -> None:
        """Write the rows with their reasons to `_dead/` (Arrow file, then the JSON that says why)."""
        first = reasons[0] if reasons else ""
        self._write_dead(ipc_file_bytes(with_reasons(rows, reasons)), "arrow",
                         {"where": f"consumer of {self.name}", "reason": first, "rows": len(reasons)})

    def _write_dead(self, payload: bytes, ext: str, meta: dict) -> None:
        dead = f"{self.base}/_dead"
        self.fs.makedirs(dead, exist_ok=True)
        stem = f"{dead}/{time.time_ns():020d}.{uuid.uuid4().hex[:8]}"
        with self.fs.open(f"{stem}.{ext}", "wb") as f:
            f.write(payload)
        tmp = f"{self.base}/_tmp/{uuid.uuid4().hex}.json"
        with self.fs.open(tmp, "w") as f:
            json.dump({**meta, "payload": f"{stem}.{ext}".rsplit("/", 1)[1]}, f)
        self.fs.mv(tmp, f"{stem}.json")  # last: a dead letter is listed once whole

    def dead_letters(self) -> list[dict]:
        """Every dead letter under `_dead/`, oldest first (see Stream.dead_letters)."""
        dead = f"{self.base}/_dead"
        if not self.fs.exists(dead):
            return []
        out = []
        for path in sorted(p for p in self.fs.ls(dead, detail=False) if p.endswith(".json")):
            with self.fs.open(path, "r") as f:
                meta = json.load(f)
            payload = f"{dead}/{meta['payload']}"
            rows = None
            if payload.endswith(".arrow"):
                with self.fs.open(payload, "rb") as f:
                    rows = pa.ipc.open_file(pa.BufferReader(f.read())).read_all()
            out.append({**meta, "rows": rows})
        return out

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
