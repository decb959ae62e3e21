"""The redis stream backend: Redis Streams, one stream key per partition, one consumer group per student population.

Keys, for a stream `name` (prefix `recdistill:`):

    recdistill:{name}:{p}        the partition's stream; each entry holds many rows as Arrow IPC stream bytes
    recdistill:{name}:dead       dead letters: malformed entries and entries delivered too often, with the reason
    recdistill:{name}:rows       hash: `appended` rows, and `acked:{group}` rows each group has acknowledged

Entry fields: `b` (Arrow IPC bytes), `n` (rows), `t` (largest event time), `pid` (producer id), `seq` (largest
producer sequence). Batching many rows per entry is what makes the throughput reasonable: a Redis command costs
tens of microseconds, a row of Arrow a few nanoseconds.

Consumer protocol (at-least-once): `poll` reads with XREADGROUP; entries stay in the group's pending entries list
(PEL) until `commit(cursor)` sends XACK, which the student calls once its checkpoint holds the step that trained on
them. A consumer that restarts under the same consumer name first re-reads its own PEL (XREADGROUP with id 0); the
entries of a consumer that never comes back are taken over with XAUTOCLAIM once idle for `claim_idle_ms`; a live
consumer keeps the entries it holds until its next checkpoint from going idle with `heartbeat()` (XCLAIM JUSTID to
itself, not counted as a delivery), which every poll calls. An entry
delivered more than `dead_letter_after` times (a poison entry that kills its consumer) and an entry that cannot be
decoded are moved to the dead-letter stream, acknowledged, logged with their entry id, and consumption goes on.
Malformed *rows* inside a good entry (found by the consumer's checks, recdistill/streams/validate.py) go to the same
dead-letter stream through `dead_letter(rows, reasons)`, as Arrow bytes with a `dead_reason` column; their entry is
acknowledged with the consumer's commit.

Reconnecting: a consumer call (poll, commit, lag, dead_letter) that finds the server unreachable (killed,
restarting, loading its AOF) is retried with backoff for up to `reconnect_s`, then fails with a StreamError that
says the server did not come back. After a reconnect the consumer re-reads its own pending entries (a poll whose
reply was lost left its entries there) and, if the restarted server lost the group, recreates it from the start;
either way rows come again and are dropped downstream as duplicates, and nothing is lost. Appends are not retried
here: the producer must learn of a restart (`ServerRestarted`) and re-send from its checkpoint.

Durability: with the AOF on and `appendfsync everysec`, a server crash can lose about the last second of appends.
The producer re-sends from its checkpoint: an append fails with a connection error during the crash, or with
`ServerRestarted` on the first append after a restart (the server's run id changed), and then
`producer_high_water(pid)`, the largest sequence number of that producer still in the stream, says where to append
from again (the joiner and students drop the duplicates).
Retention: `maxlen` (XADD MAXLEN ~) or `retention_ms` (XADD MINID ~ now - retention); either must exceed the
slowest group's lag, since Redis trims entries whether or not a group has read them.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import pyarrow as pa
import redis

from recdistill.streams.base import (
    Cursor,
    Stream,
    StreamError,
    as_table,
    check_keys,
    column_np,
    concat_compatible,
    split_by_partition,
    with_reasons,
)

log = logging.getLogger(__name__)
PREFIX = "recdistill"


def encode(table: pa.Table) -> bytes:
    """Arrow IPC stream bytes of a table (the `b` field of an entry)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def decode(data: bytes, where: str) -> pa.Table:
    """The table in an entry's `b` field; StreamError naming `where` if it is not Arrow IPC with the key columns."""
    try:
        table = pa.ipc.open_stream(pa.BufferReader(data)).read_all()
    except (pa.ArrowInvalid, OSError, TypeError) as e:
        raise StreamError(f"{where}: not an Arrow IPC record batch ({e})") from e
    check_keys(table, where)
    return table


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ServerRestarted(StreamError):
    """The server restarted since the producer's last append: re-send from `producer_high_water()` + 1."""

    fix = "re-send from RedisStream.producer_high_water() + 1 (the producer's checkpoint)"


class RedisStream(Stream):
    """A stream on a Redis server: producer side (`append`) and one consumer of group `group` (`poll` ...).

    entry_rows: rows per entry at most. dead_letter_after: deliveries after which an entry is dead-lettered.
    claim_idle_ms: idle time after which another consumer's pending entry is taken over (XAUTOCLAIM).
    reconnect_s: how long a consumer call retries a server it cannot reach before failing.
    """

    def __init__(self, url: str, name: str, partitions: int = 1, *, group: str = "students", consumer: str = "c0",
                 producer_id: str = "p0", entry_rows: int = 16384, maxlen: int | None = None,
                 retention_ms: int | None = None, dead_letter_after: int = 5, claim_idle_ms: int = 60_000,
                 reconnect_s: float = 60.0) -> None:
        self.url, self.name, self.partitions = url, name, partitions
        self.group, self.consumer, self.producer_id = group, consumer, producer_id
        self.entry_rows, self.maxlen, self.retention_ms = entry_rows, maxlen, retention_ms
        self.dead_letter_after, self.claim_idle_ms = dead_letter_after, claim_idle_ms
        self.reconnect_s = reconnect_s
        self.reconnects = 0  # times a consumer call found the server gone and got it back
        self.client = redis.Redis.from_url(url, socket_timeout=30, health_check_interval=0)
        self.keys = [f"{PREFIX}:{name}:{p}" for p in range(partitions)]
        self.dead_key, self.rows_key = f"{PREFIX}:{name}:dead", f"{PREFIX}:{name}:rows"
        self.dead_lettered: list[tuple[str, str, str]] = []  # (stream key, entry id, reason), most recent last
        self._group_ready = False
        self._recovering = True  # re-read this consumer's own pending entries before new ones
        self._pel_after = {k: "0" for k in self.keys}
        self._next_claim = 0.0
        self._seek_floor: dict[str, tuple[str, int]] = {}
        self._run_id: str | None = None  # the server's run id at this producer's last append
        self._held: set[tuple[str, str]] = set()  # (key, entry id) handed out by poll and not committed yet
        self._next_beat = 0.0

    @contextmanager
    def _server(self, what: str):
        try:
            yield
        except redis.RedisError as e:
            raise StreamError(f"stream {self.name!r}: {what} on {self.url} failed ({type(e).__name__}: {e})",
                              fix="check that the redis server runs and stream.redis_url points at it") from e

    def _reconnecting(self, what: str, fn):  # noqa: ANN202 - returns what fn returns
        """fn(), retried with backoff while the server cannot be reached, for up to `reconnect_s` (module docstring)."""
        lost, delay = None, 0.05
        while True:
            try:
                out = fn()
            except StreamError as e:
                if not isinstance(e.__cause__, redis.ConnectionError | redis.TimeoutError):  # incl. BusyLoadingError
                    raise
                now = time.monotonic()
                if lost is None:
                    lost = now
                    log.warning("stream %s: redis at %s unreachable during %s (%s); retrying for up to %.0f s",
                                self.name, self.url, what, e.__cause__, self.reconnect_s)
                if now - lost >= self.reconnect_s:
                    raise StreamError(f"stream {self.name!r}: the redis server at {self.url} did not come back within "
                                      f"{self.reconnect_s:g} s ({what}: {e.__cause__})",
                                      fix="start the redis server again (its AOF keeps the streams and groups) and "
                                      "resume from the checkpoint, or raise stream.reconnect_s") from e
                # Once back, re-read this consumer's own pending entries first: a poll whose reply was lost left its
                # entries there, and a server that lost its last writes may have rolled the group back.
                self._recovering, self._pel_after, self._next_beat = True, {k: "0" for k in self.keys}, 0.0
                time.sleep(min(delay, max(0.0, lost + self.reconnect_s - now)))
                delay = min(2 * delay, 1.0)
                continue
            if lost is not None:
                self.reconnects += 1
                log.warning("stream %s: redis at %s is back after %.1f s", self.name, self.url,
                            time.monotonic() - lost)
            return out

    # ---- producer ------------------------------------------------------------------------------------------------
    def append(self, batch: pa.RecordBatch | pa.Table) -> int:
        """XADD the rows, `entry_rows` per entry, in one MULTI/EXEC with the row counter; returns the rows."""
        table = as_table(batch)
        check_keys(table, f"stream {self.name!r} append")
        trim = ({"maxlen": self.maxlen, "approximate": True} if self.maxlen else
                {"minid": str(int(time.time() * 1000) - self.retention_ms), "approximate": True}
                if self.retention_ms else {})
        with self._server("append"):
            self._check_same_server()
            pipe = self.client.pipeline(transaction=True)
            for p, part in split_by_partition(table, self.partitions):
                for start in range(0, part.num_rows, self.entry_rows):
                    chunk = part.slice(start, self.entry_rows)
                    fields = {"b": encode(chunk), "n": chunk.num_rows, "pid": self.producer_id,
                              "t": int(column_np(chunk, "event_time_ms").max()),
                              "seq": int(column_np(chunk, "seq").max())}
                    pipe.xadd(self.keys[p], fields, **trim)
            pipe.hincrby(self.rows_key, "appended", table.num_rows)
            pipe.execute()
        return table.num_rows

    def _check_same_server(self) -> None:
        """Raise ServerRestarted if the server restarted since this producer's last append (its run id changed).

        redis-py reconnects by itself, so without this check a producer idle during a crash would append on top of
        a log that lost its last second, and the gap would stay invisible: the high water would be past it."""
        run_id = self.client.info("server")["run_id"]
        if self._run_id is not None and run_id != self._run_id:
            self._run_id = run_id
            raise ServerRestarted(f"stream {self.name!r}: the redis server at {self.url} restarted since the last "
                                  "append; appends of its last fsync window may be lost")
        self._run_id = run_id

    def producer_high_water(self, producer_id: str | None = None, page: int = 64) -> int:
        """Largest `seq` the producer has in the stream (-1 if none): where a producer re-sends from after the
        server lost its last writes. Scans each partition backwards until it meets one of that producer's entries."""
        pid = (producer_id or self.producer_id).encode()
        best = -1
        with self._server("reading the producer's high water"):
            for key in self.keys:
                end = "+"
                while True:
                    entries = self.client.xrevrange(key, max=end, count=page)
                    mine = [int(f[b"seq"]) for _, f in entries if f and f.get(b"pid") == pid]
                    if mine:
                        best = max(best, max(mine))
                        break
                    if len(entries) < page:
                        break
                    end = "(" + entries[-1][0].decode()
        return best

    # ---- consumer ------------------------------------------------------------------------------------------------
    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        with self._server("creating the consumer group"):
            for key in self.keys:
                try:
                    self.client.xgroup_create(key, self.group, id="0", mkstream=True)
                except redis.ResponseError as e:
                    if "BUSYGROUP" not in str(e):
                        raise
        self._group_ready = True

    def poll(self, max_rows: int, timeout: float = 0.0) -> tuple[pa.Table | None, Cursor]:
        """Own pending entries first (after a restart), then idle entries of others (XAUTOCLAIM), then new ones."""
        return self._reconnecting("poll", lambda: self._poll_or_regroup(max_rows, timeout))

    def _poll_or_regroup(self, max_rows: int, timeout: float) -> tuple[pa.Table | None, Cursor]:
        try:
            self._ensure_group()
            self.heartbeat()
            return self._poll(max_rows, timeout)
        except StreamError as e:
            if "NOGROUP" not in str(e):
                raise
            # The server lost the group (a crash inside the AOF fsync window, or a flush): recreate it from the
            # start of the stream. At-least-once holds; the rows already consumed come again and are dropped as
            # duplicates downstream.
            log.warning("stream %s: consumer group %s is gone on the server; recreated from the start",
                        self.name, self.group)
            self._group_ready, self._recovering = False, False
            self._held.clear()
            self._ensure_group()
            return self._poll(max_rows, timeout)

    def _poll(self, max_rows: int, timeout: float) -> tuple[pa.Table | None, Cursor]:
        # XREADGROUP's COUNT is per stream key: spread the entries the caller asked for over the partitions.
        count = max(1, -(-max_rows // (self.entry_rows * self.partitions)))
        with self._server("poll"):
            while True:
                entries, caught_up = (self._read_pending(count) if self._recovering else []), False
                if not entries and time.monotonic() >= self._next_claim:
                    entries = self._claim_idle(count)
                    self._next_claim = time.monotonic() + self.claim_idle_ms / 2000
                read_any = bool(entries)
                entries = self._drop_poison(entries) if entries else []
                if not entries and not read_any:
                    resp = self.client.xreadgroup(self.group, self.consumer, {k: ">" for k in self.keys},
                                                  count=count, block=int(timeout * 1000) if timeout > 0 else None)
                    entries = [(k.decode(), eid.decode(), f) for k, items in resp or [] for eid, f in items]
                    read_any = bool(entries)
                    caught_up = all(len(items) < count for _, items in resp or [])  # no key filled its COUNT
                table, cursor = self._assemble(entries)
                cursor.caught_up = caught_up
                # Read something but all of it was dead-lettered: look again rather than answer "nothing new".
                if table is not None or not cursor.empty or not read_any:
                    return table, cursor

    def _read_pending(self, count: int) -> list[tuple[str, str, dict]]:
        resp = self.client.xreadgroup(self.group, self.consumer, dict(self._pel_after), count=count)
        out = [(k.decode(), eid.decode(), f) for k, items in resp or [] for eid, f in items]
        for key, eid, _ in out:
            self._pel_after[key] = eid
        if not out:
            self._recovering = False
        return out

    def _claim_idle(self, count: int) -> list[tuple[str, str, dict]]:
        """Take over entries idle for `claim_idle_ms` (XAUTOCLAIM): those of consumers that died.

        A live consumer's entries wait for its next checkpoint (a commit can come minutes after the poll); heartbeat()
        keeps them from going idle, and entries this consumer already holds are never handed out a second time."""
        out = []
        for key in self.keys:
            resp = self.client.xautoclaim(key, self.group, self.consumer, self.claim_idle_ms, "0-0", count=count)
            out += [(key, _text(eid), f) for eid, f in resp[1] if (key, _text(eid)) not in self._held]
        return out

    def heartbeat(self) -> None:
        """Reset the idle time of the entries this consumer holds uncommitted (XCLAIM to itself with JUSTID, which
        does not count as a delivery), so no other consumer takes them over. `poll` calls it; a consumer that holds
        rows without polling for longer than claim_idle_ms / 2 calls it itself."""
        if not self._held or time.monotonic() < self._next_beat:
            return
        by_key: dict[str, list[str]] = {}
        for key, eid in self._held:
            by_key.setdefault(key, []).append(eid)
        with self._server("heartbeat"):
            pipe = self.client.pipeline(transaction=False)
            for key, ids in by_key.items():
                pipe.xclaim(key, self.group, self.consumer, 0, ids, justid=True)
            pipe.execute()
        self._next_beat = time.monotonic() + self.claim_idle_ms / 4000

    def _drop_poison(self, entries: list[tuple[str, str, dict]]) -> list[tuple[str, str, dict]]:
        """Dead-letter the re-delivered entries that have been delivered more than `dead_letter_after` times."""
        pipe = self.client.pipeline(transaction=False)
        for key, eid, _ in entries:
            pipe.xpending_range(key, self.group, min=eid, max=eid, count=1)
        keep = []
        for (key, eid, fields), info in zip(entries, pipe.execute(), strict=True):
            times = info[0]["times_delivered"] if info else 0
            if times > self.dead_letter_after:
                self._dead_letter(key, eid, fields, f"delivered {times} times (> {self.dead_letter_after})")
            else:
                keep.append((key, eid, fields))
        return keep

    def _dead_letter(self, key: str, eid: str, fields: dict | None, reason: str) -> None:
        """Copy the entry to the dead-letter stream with the reason, acknowledge it, log its id."""
        log.warning("stream %s: entry %s of %s dead-lettered: %s", self.name, eid, key, reason)
        self.dead_lettered = [*self.dead_lettered[-999:], (key, eid, reason)]
        try:
            rows = int((fields or {}).get(b"n", 0) or 0)
        except ValueError:  # a malformed entry may have any `n`; it then counts as no rows
            rows = 0
        self.dead_rows += rows
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.dead_key, {**(fields or {}), "src": key, "id": eid, "group": self.group, "reason": reason})
        pipe.xack(key, self.group, eid)
        pipe.hincrby(self.rows_key, f"acked:{self.group}", rows)
        pipe.execute()
        self._held.discard((key, eid))

    def _assemble(self, entries: list[tuple[str, str, dict]]) -> tuple[pa.Table | None, Cursor]:
        cursor, tables = Cursor(), []
        for key, eid, fields in entries:
            where = f"stream {self.name!r} entry {eid} of {key}"
            try:
                if not fields or b"b" not in fields:
                    raise StreamError(f"{where}: entry has no 'b' field (trimmed, or not written by recdistill)")
                table = decode(fields[b"b"], where)
            except StreamError as e:
                self._dead_letter(key, eid, fields, str(e))
                continue
            table = self._apply_seek_floor(key, eid, table)
            p = self.keys.index(key)
            self._held.add((key, eid))
            cursor.acks.append((key, eid, table.num_rows))
            cursor.positions[p] = eid
            cursor.rows += table.num_rows
            if table.num_rows:
                tmax = int(column_np(table, "event_time_ms").max())
                cursor.event_time_max[p] = max(cursor.event_time_max.get(p, tmax), tmax)
                tables.append((table, where))
        return concat_compatible(self, tables), cursor

    def dead_letter(self, rows: pa.Table, reasons: list[str]) -> None:
        """XADD the rows with their reasons to the dead-letter stream (one entry); acknowledges nothing."""
        payload = with_reasons(rows, reasons)
        fields = {"b": encode(payload), "n": payload.num_rows, "group": self.group, "src": f"consumer {self.consumer}",
                  "reason": reasons[0] if reasons else ""}

        def add() -> None:
            with self._server("dead letter"):
                self.client.xadd(self.dead_key, fields)

        self._reconnecting("dead letter", add)

    def dead_letters(self) -> list[dict]:
        """The dead-letter stream, oldest first: whole entries (`where` = their id) and rows found malformed."""
        with self._server("reading dead letters"):
            entries = self.client.xrange(self.dead_key)
        out = []
        for eid, f in entries:
            try:
                rows = pa.ipc.open_stream(pa.BufferReader(f[b"b"])).read_all() if b"b" in f else None
            except (pa.ArrowInvalid, OSError):
                rows = None
            where = _text(f[b"id"]) if b"id" in f else _text(f.get(b"src", b"")) + f" ({_text(eid)})"
            out.append({"where": where, "reason": _text(f.get(b"reason", b"")), "rows": rows})
        return out

    def commit(self, cursor: Cursor) -> None:
        """XACK the cursor's entries and count the rows that this call acknowledged (XACK is idempotent: a retry
        after a lost reply counts nothing twice). A group the server lost has nothing to acknowledge: the next poll
        recreates it, and the rows come again as duplicates."""
        if not cursor.acks:
            return
        try:
            self._reconnecting("commit", lambda: self._commit(cursor))
        except StreamError as e:
            if "NOGROUP" not in str(e):
                raise
            log.warning("stream %s: consumer group %s is gone on the server; nothing to acknowledge", self.name,
                        self.group)
            self._held.difference_update((key, eid) for key, eid, _ in cursor.acks)

    def _commit(self, cursor: Cursor) -> None:
        with self._server("commit"):
            pipe = self.client.pipeline(transaction=False)
            for key, eid, _ in cursor.acks:
                pipe.xack(key, self.group, eid)
            acked = sum(rows for (_, _, rows), n in zip(cursor.acks, pipe.execute(), strict=True) if n)
            self._held.difference_update((key, eid) for key, eid, _ in cursor.acks)
            if acked:
                self.client.hincrby(self.rows_key, f"acked:{self.group}", acked)

    def seek(self, *, offset: dict[int, int | str] | int | str | None = None, event_time_ms: int | None = None) -> None:
        """XGROUP SETID for every partition: to an entry id ("0" = the start, "$" = the end; the next entry after
        it is delivered next) or to the entry holding the first row with event time >= `event_time_ms` (rows of that
        entry older than it are filtered out). Entries already pending stay pending (XAUTOCLAIM recovers them)."""
        if (offset is None) == (event_time_ms is None):
            raise ValueError("seek takes exactly one of offset and event_time_ms")
        self._ensure_group()
        with self._server("seek"):
            for p, key in enumerate(self.keys):
                if event_time_ms is not None:
                    last = self._id_before_time(key, event_time_ms)
                elif isinstance(offset, dict):
                    if p not in offset:
                        continue
                    last = str(offset[p])
                else:
                    last = str(offset)
                self.client.xgroup_setid(key, self.group, last)
        self._recovering = False

    def _id_before_time(self, key: str, t: int, page: int = 256) -> str:
        """Id of the last entry whose rows are all older than t ("0" if none); remembers the floor for poll."""
        start, prev = "-", "0"
        while True:
            entries = self.client.xrange(key, min=start, count=page)
            for eid, fields in entries:
                if fields and int(fields.get(b"t", -1)) >= t:
                    self._seek_floor[key] = (eid.decode(), t)
                    return prev
                prev = eid.decode()
            if len(entries) < page:
                return prev
            start = "(" + prev

    def _apply_seek_floor(self, key: str, eid: str, table: pa.Table) -> pa.Table:
        floor = self._seek_floor.get(key)
        if floor is None or floor[0] != eid:
            return table
        del self._seek_floor[key]
        return table.filter(pa.array(column_np(table, "event_time_ms") >= floor[1]))

    def lag(self) -> int:
        """Rows appended minus rows this group acknowledged (dead letters count as acknowledged). Approximate after
        a seek or when retention trimmed unread entries."""

        def get() -> list:
            with self._server("lag"):
                return self.client.hmget(self.rows_key, ["appended", f"acked:{self.group}"])

        got = self._reconnecting("lag", get)
        return int(got[0] or 0) - int(got[1] or 0)

    def pending(self) -> int:
        """Entries delivered to the group and not acknowledged yet, over all partitions."""
        self._ensure_group()
        with self._server("xpending"):
            return sum(int(self.client.xpending(k, self.group)["pending"]) for k in self.keys)

    def entries(self) -> int:
        """Entries held in the partition streams now (after trimming)."""
        with self._server("xlen"):
            return sum(int(self.client.xlen(k)) for k in self.keys)

    def state_dict(self) -> dict:
        """Names only: the group's position lives in the server (XACK); the checkpoint keeps who it is."""
        return {"stream": self.name, "partitions": self.partitions, "group": self.group, "consumer": self.consumer}

    def load_state_dict(self, state: dict) -> None:
        """Check the names and re-read this consumer's pending entries on the next poll."""
        want = self.state_dict()
        if any(state.get(k) != v for k, v in want.items() if k != "consumer"):
            raise StreamError(f"stream {self.name!r}: checkpoint state {state} does not match {want}")
        self.consumer = state.get("consumer", self.consumer)
        self._recovering, self._pel_after = True, {k: "0" for k in self.keys}

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()

