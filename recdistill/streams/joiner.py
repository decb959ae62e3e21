"""The joiner: sample stream + teacher-signal stream -> one joined stream that N students consume.

Rules (DESIGN §4 'Streams'), all on event time:

* **Watermark** = the minimum over the sample stream's partitions of the latest event time polled from each (None
  until every partition has been seen). Only the sample stream drives it: a teacher that stalls or dies must not
  stop samples from going out with labels only, which is the point of the bounded delay.
* **On time**: a sample and its signal (same `sample_id`) are both buffered; the pair goes out as soon as both have
  arrived, with `has_signal` true. A signal may come before its sample (it then waits for it).
* **Expired**: a sample still without a signal when the watermark reaches `event_time + max_delay` goes out with
  labels only (`has_signal` false, signal columns null).
* **Clock watermark** (`stream.clock_watermark`, off by default): for a live stream whose event times are this
  machine's wall clock. The data watermark trails the clock by the producer's batching and the transport (a sample
  stamped at t is polled some milliseconds after t), so a sample would expire only once a sample stamped after its
  deadline has been polled, up to a poll later than needed; and a quiet partition holds it back altogether. With
  the option on, when both inputs are caught up (the last polls read every partition to its end: no backlog), the
  clock's now also expires samples, so a sample leaves within max_delay plus one poll interval of real time.
  It drives nothing else: duplicates, stale samples and late signals stay on the data watermark, so a producer that
  lags the clock loses no sample (its samples go out label-only at once if already past their deadline). Off for
  replays and the simulated timeline, where event times are not now.
* **Late**: a signal whose sample already went out label-only, or that waited `max_delay` for a sample that never
  came, is counted late and handed to `late_sink` (the caller keeps it in the signal store); it is never joined.
* **Duplicates** (at-least-once delivery upstream) are dropped by sample id on both inputs. Ids are remembered for
  `dedup_horizon` of event time behind the watermark (bounded memory); a sample older than that horizon cannot be
  told from a duplicate and is dropped as `stale`.
* **Bounded buffer**: more than `buffer_rows` samples waiting -> the oldest go out label-only early (`evicted`);
  more than `buffer_rows` signals waiting -> the oldest go to `late_sink` (`signals_dropped`).
* **Malformed input** (recdistill/streams/validate.py) is dead-lettered on the input stream that brought it, logged
  by sample id and counted (`malformed_samples`, `malformed_signals`), and the join goes on: a sample without a
  finite value in a `label_*` column of the first sample table, or whose table lacks a column of the first one (the
  joined schema is fixed by it) or has one of another type; a signal without `num_tasks` logits, a teacher step or
  a version. (A table that lacks a column but comes in one poll with complete ones reads as nulls there.)
* Signal values are passed through untouched: NaN or infinite logits go out as they came, with `has_signal` true;
  the student rejects non-finite teacher logits and counts them (DESIGN §4 'Losses'), as in the batch phase.

The work per step is a few Arrow takes/filters and one sort-based intersection (`np.intersect1d`) of the waiting ids,
no per-row Python. :class:`JoinCore` is the pure state machine (event times and the clock passed in, so tests are
deterministic); :class:`Joiner` wires it to streams and commits an input cursor only once every row it delivered has
left the joiner (emitted, expired, late or dropped), so a joiner that crashes is re-fed what it had in memory.
An append to the joined stream that fails (a connection lost, `ServerRestarted`) leaves the joiner's memory ahead of
the stream: the joiner process must then end and be restarted from its inputs' committed positions, never carry
on. With inputs and output on one Redis server the AOF keeps their order, so a crash that loses joined entries also
loses the later XACKs of the inputs that produced them, and those inputs come again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from recdistill.config import StreamConfig
from recdistill.streams.base import (
    SIGNAL_COLUMNS,
    VERSION_TYPE,
    Cursor,
    IdWindow,
    Stream,
    as_table,
    column_np,
    first_unseen,
    joined_schema,
    signal_schema,
)
from recdistill.streams.validate import RecordCheck, dead_letter_all, split_malformed


def match_ids(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ia, ib) with a[ia] == b[ib], for arrays of unique ids: one sort of the shorter array and a binary search
    per id of the longer (np.intersect1d with indices sorts both together with a stable sort). The shorter one is
    usually the new batch: when one input runs ahead of the other, its pool of waiting rows grows large."""
    if not len(a) or not len(b):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    if len(a) < len(b):
        ib, ia = match_ids(b, a)
        return ia, ib
    order = np.argsort(b)
    sb = b[order]
    pos = np.searchsorted(sb, a)
    np.minimum(pos, len(sb) - 1, out=pos)
    ia = np.flatnonzero(sb[pos] == a)
    return ia, order[pos[ia]]


class _Pool:
    """Rows waiting in the joiner: a table plus numpy copies of its ids, event times and input tick."""

    def __init__(self) -> None:
        self.table: pa.Table | None = None
        self.ids = np.empty(0, np.int64)
        self.times = np.empty(0, np.int64)
        self.ticks = np.empty(0, np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, table: pa.Table, ids: np.ndarray, times: np.ndarray, tick: int) -> None:
        if not len(ids):
            return
        self.table = table if self.table is None else pa.concat_tables([self.table, table])
        self.ids = np.concatenate([self.ids, ids])
        self.times = np.concatenate([self.times, times])
        self.ticks = np.concatenate([self.ticks, np.full(len(ids), tick, np.int64)])

    def take_out(self, mask: np.ndarray) -> tuple[pa.Table, np.ndarray]:
        """Remove the rows where mask is true; returns them (table, event times), in pool order."""
        return self.take_rows(np.flatnonzero(mask))

    def take_rows(self, idx: np.ndarray) -> tuple[pa.Table, np.ndarray]:
        """Remove the rows at positions `idx`; returns them (table, event times) in the order of `idx`."""
        out, times = self.table.take(idx), self.times[idx]
        keep = np.ones(len(self.ids), bool)
        keep[idx] = False
        self.table = self.table.filter(pa.array(keep))
        if self.table.num_rows and len(self.table.column(0).chunks) > 16:  # many small adds: keep takes cheap
            self.table = self.table.combine_chunks()
        self.ids, self.times, self.ticks = self.ids[keep], self.times[keep], self.ticks[keep]
        return out, times

    def oldest(self, n: int) -> np.ndarray:
        """Mask of the n rows with the smallest event times."""
        mask = np.zeros(len(self.ids), bool)
        mask[np.argpartition(self.times, n - 1)[:n]] = True
        return mask


class _Ring:
    """The last `size` values of a series, for percentiles in bounded memory."""

    def __init__(self, size: int) -> None:
        self.buf, self.n = np.empty(size, np.float64), 0

    def add(self, values: np.ndarray) -> None:
        values = values[-len(self.buf):]
        idx = (self.n + np.arange(len(values))) % len(self.buf)
        self.buf[idx] = values
        self.n += len(values)

    def percentile(self, q: float) -> float | None:
        """The q-th percentile of the values held (None if none)."""
        return float(np.percentile(self.buf[:min(self.n, len(self.buf))], q)) if self.n else None


@dataclass
class JoinCounts:
    """Counters of a joiner, all in rows."""

    samples_in: int = 0
    signals_in: int = 0
    joined: int = 0
    expired: int = 0
    evicted: int = 0
    late: int = 0
    signals_dropped: int = 0
    duplicate_samples: int = 0
    duplicate_signals: int = 0
    stale: int = 0
    malformed_samples: int = 0  # dead-lettered on the sample stream
    malformed_signals: int = 0  # dead-lettered on the signal stream


class JoinCore:
    """The join state machine; see the module docstring for the rules. Times in milliseconds of event time.

    num_tasks: logits per signal. late_sink: called with a table of signals that will never be joined.
    """

    def __init__(self, num_tasks: int, max_delay_ms: int, *, buffer_rows: int = 2_000_000,
                 dedup_horizon_ms: int | None = None, late_sink: Callable[[pa.Table], None] | None = None,
                 latency_window: int = 100_000) -> None:
        self.num_tasks, self.max_delay_ms, self.buffer_rows = num_tasks, max_delay_ms, buffer_rows
        self.dedup_horizon_ms = dedup_horizon_ms if dedup_horizon_ms is not None else 2 * max_delay_ms
        if self.dedup_horizon_ms < max_delay_ms:  # a sample still waiting for its signal would count as stale
            raise ValueError(f"dedup horizon ({self.dedup_horizon_ms} ms) must be at least max_delay "
                             f"({max_delay_ms} ms)")
        self.late_sink = late_sink
        self.samples, self.signals = _Pool(), _Pool()
        # ids already taken in (dedup), and ids of samples that went out label-only (late-signal detection)
        self.seen_samples, self.seen_signals, self.label_only = IdWindow(), IdWindow(), IdWindow()
        self.counts = JoinCounts()
        self.latency_all, self.latency_joined = _Ring(latency_window), _Ring(latency_window)
        self.out_schema: pa.Schema | None = None
        self.watermark_ms: int | None = None

    # ---- one step ------------------------------------------------------------------------------------------------
    def step(self, samples: pa.Table | None, signals: pa.Table | None, watermark_ms: int | None, now_ms: int,
             tick: int = 0, clock_watermark_ms: int | None = None) -> pa.Table | None:
        """Take new input rows, join, expire under `watermark_ms`; returns the rows that go out now (or None).

        `now_ms` is the processing-time clock (join latency = now - event time of the row that goes out); `tick`
        tags the new rows so the caller can tell when the input that brought them may be committed.
        `clock_watermark_ms` (the clock watermark, module docstring) expires waiting samples too, nothing else.
        """
        out: list[pa.Table] = []
        if samples is not None and samples.num_rows:
            self._take_samples(as_table(samples), tick)
        if signals is not None and signals.num_rows:
            self._take_signals(as_table(signals), tick)
        out += self._match(now_ms)
        # The new watermark applies after the rows polled with it were matched: a signal polled in the same step
        # as the sample rows that moved the watermark past its deadline came in time.
        if watermark_ms is not None:
            self.watermark_ms = max(self.watermark_ms or watermark_ms, watermark_ms)
        out += self._expire(now_ms, clock_watermark_ms)
        out += self._enforce_cap(now_ms)
        if self.watermark_ms is not None:
            horizon = self.watermark_ms - self.dedup_horizon_ms
            for window in (self.seen_samples, self.seen_signals, self.label_only):
                window.evict(horizon)
        out = [t for t in out if t.num_rows]
        return pa.concat_tables(out) if out else None

    def _fresh(self, table: pa.Table, seen: IdWindow) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, times, keep): keep drops in-batch repeats and ids already in `seen`; the kept ids join `seen`."""
        ids, times = column_np(table, "sample_id"), column_np(table, "event_time_ms")
        keep, kept_sorted = first_unseen(ids, seen, first=False)  # an input's copies are identical
        if len(kept_sorted):
            seen.add(kept_sorted, times[keep], is_sorted=True)
        return ids, times, keep

    def _take_samples(self, table: pa.Table, tick: int) -> None:
        if self.out_schema is None:
            self.out_schema = joined_schema(table.schema, self.num_tasks)
        ids, times, keep = self._fresh(table, self.seen_samples)
        self.counts.samples_in += len(ids)
        self.counts.duplicate_samples += int(len(ids) - keep.sum())
        if self.watermark_ms is not None:
            stale = keep & (times < self.watermark_ms - self.dedup_horizon_ms)
            self.counts.stale += int(stale.sum())
            keep &= ~stale
        if not keep.all():
            table, ids, times = table.filter(pa.array(keep)), ids[keep], times[keep]
        self.samples.add(table, ids, times, tick)

    def _take_signals(self, table: pa.Table, tick: int) -> None:
        if table.schema.field("teacher_version").type != VERSION_TYPE:  # a producer that sent plain strings
            i = table.schema.get_field_index("teacher_version")
            table = table.set_column(i, "teacher_version", table.column(i).cast(pa.string()).dictionary_encode())
        ids, times, keep = self._fresh(table, self.seen_signals)
        self.counts.signals_in += len(ids)
        self.counts.duplicate_signals += int(len(ids) - keep.sum())
        if not keep.all():
            table, ids, times = table.filter(pa.array(keep)), ids[keep], times[keep]
        # Late on arrival: its sample already went out label-only, or it is past its own deadline.
        late = self.label_only.contains(ids)
        if self.watermark_ms is not None:
            late |= times + self.max_delay_ms <= self.watermark_ms
        if late.any():
            self._late(table.filter(pa.array(late)))
            table, ids, times = table.filter(pa.array(~late)), ids[~late], times[~late]
        self.signals.add(table, ids, times, tick)

    def _match(self, now_ms: int) -> list[pa.Table]:
        if not len(self.samples) or not len(self.signals):
            return []
        si, gi = match_ids(self.samples.ids, self.signals.ids)
        if not len(si):
            return []
        # si[k] and gi[k] hold the same sample id: taking rows in these orders pairs them.
        s_tab, s_times = self.samples.take_rows(si)
        g_tab, _ = self.signals.take_rows(gi)
        self.counts.joined += s_tab.num_rows
        lat = now_ms - s_times.astype(np.float64)
        self.latency_joined.add(lat)
        self.latency_all.add(lat)
        return [self._emit(s_tab, g_tab)]

    def _expire(self, now_ms: int, clock_watermark_ms: int | None = None) -> list[pa.Table]:
        marks = [w for w in (self.watermark_ms, clock_watermark_ms) if w is not None]
        if not marks:
            return []
        out = []
        due = self.samples.times + self.max_delay_ms <= max(marks)
        if due.any():
            out.append(self._label_only(due, now_ms))
            self.counts.expired += out[-1].num_rows
        if self.watermark_ms is None:
            return out
        orphan = self.signals.times + self.max_delay_ms <= self.watermark_ms
        if orphan.any():
            self._late(self.signals.take_out(orphan)[0])
        return out

    def _enforce_cap(self, now_ms: int) -> list[pa.Table]:
        out = []
        if len(self.samples) > self.buffer_rows:
            out.append(self._label_only(self.samples.oldest(len(self.samples) - self.buffer_rows), now_ms))
            self.counts.evicted += out[-1].num_rows
        if len(self.signals) > self.buffer_rows:
            dropped, _ = self.signals.take_out(self.signals.oldest(len(self.signals) - self.buffer_rows))
            self.counts.signals_dropped += dropped.num_rows
            if self.late_sink is not None:
                self.late_sink(dropped)
        return out

    def _label_only(self, mask: np.ndarray, now_ms: int) -> pa.Table:
        s_tab, s_times = self.samples.take_out(mask)
        self.label_only.add(column_np(s_tab, "sample_id"), s_times)
        self.latency_all.add(now_ms - s_times.astype(np.float64))
        return self._emit(s_tab, None)

    def _late(self, table: pa.Table) -> None:
        self.counts.late += table.num_rows
        if self.late_sink is not None and table.num_rows:
            self.late_sink(table)

    def _emit(self, samples: pa.Table, signals: pa.Table | None) -> pa.Table:
        """Joined rows: the sample columns, then the signal columns (nulls when `signals` is None), has_signal."""
        n, schema = samples.num_rows, self.out_schema
        sig = [signals.column(c) if signals is not None else pa.nulls(n, schema.field(c).type) for c in SIGNAL_COLUMNS]
        has = pa.array(np.full(n, signals is not None))
        return pa.Table.from_arrays([*samples.select(schema.names[:samples.num_columns]).columns, *sig, has],
                                    schema=schema)

    # ---- bookkeeping ---------------------------------------------------------------------------------------------
    def min_live_tick(self) -> int | None:
        """Oldest input tick with rows still waiting here (None when nothing waits)."""
        ticks = [p.ticks.min() for p in (self.samples, self.signals) if len(p)]
        return int(min(ticks)) if ticks else None

    def metrics(self, now_ms: int) -> dict[str, float | int | None]:
        """Namespaced metrics: counts, join rate within max_delay, latency percentiles, watermark lag."""
        c = self.counts
        out_rows = c.joined + c.expired + c.evicted
        return {
            "join/samples_in": c.samples_in, "join/signals_in": c.signals_in, "join/joined": c.joined,
            "join/expired": c.expired, "join/evicted": c.evicted, "join/late": c.late,
            "join/signals_dropped": c.signals_dropped, "join/duplicate_samples": c.duplicate_samples,
            "join/duplicate_signals": c.duplicate_signals, "join/stale": c.stale,
            "join/malformed_samples": c.malformed_samples, "join/malformed_signals": c.malformed_signals,
            "join/join_rate": c.joined / out_rows if out_rows else None,
            "join/waiting_samples": len(self.samples), "join/waiting_signals": len(self.signals),
            "join/latency_p50_ms": self.latency_joined.percentile(50),
            "join/latency_p99_ms": self.latency_joined.percentile(99),
            "join/emit_latency_p99_ms": self.latency_all.percentile(99),
            "join/watermark_lag_ms": now_ms - self.watermark_ms if self.watermark_ms is not None else None,
        }


def _wall_ms() -> int:
    return int(time.time() * 1000)


class Joiner:
    """Polls the sample and signal streams, runs a JoinCore, appends its output to `out`, commits inputs safely.

    clock: processing-time clock in ms (a fake one in tests). Late signals go to `late_sink` (e.g. a function that
    appends them to the signal store). clock_watermark: expire by the clock too once both inputs are caught up
    (module docstring; only where event times are the clock's time).
    """

    def __init__(self, samples: Stream, signals: Stream, out: Stream, *, num_tasks: int, max_delay_ms: int,
                 poll_rows: int = 65536, clock: Callable[[], int] = _wall_ms, clock_watermark: bool = False,
                 **core_kwargs) -> None:
        self.samples_in, self.signals_in, self.out = samples, signals, out
        self.core = JoinCore(num_tasks, max_delay_ms, **core_kwargs)
        self.poll_rows, self.clock, self.clock_watermark = poll_rows, clock, clock_watermark
        self._latest: dict[int, int] = {}  # sample partition -> latest event time polled
        self._uncommitted: deque[tuple[int, Stream, Cursor]] = deque()
        self._tick = 0
        self.rows_in = self.rows_out = 0
        self._sample_check: RecordCheck | None = None  # labels of the first sample table must be finite
        self._signal_check = RecordCheck(logits=num_tasks, required=["teacher_step", "teacher_version"])
        self._signal_schema = signal_schema(num_tasks)

    @classmethod
    def from_config(cls, cfg: StreamConfig, samples: Stream, signals: Stream, out: Stream, *, num_tasks: int,
                    late_sink: Callable[[pa.Table], None] | None = None) -> Joiner:
        """A joiner with the delay, buffer, dedup horizon and poll size of the `stream` config section."""
        return cls(samples, signals, out, num_tasks=num_tasks, max_delay_ms=int(cfg.max_delay_s * 1000),
                   poll_rows=cfg.poll_rows, buffer_rows=cfg.buffer_rows, late_sink=late_sink,
                   clock_watermark=cfg.clock_watermark,
                   dedup_horizon_ms=int(cfg.dedup_horizon_s * 1000) if cfg.dedup_horizon_s else None)

    def watermark(self) -> int | None:
        """Min over the sample stream's partitions of the latest event time seen (None until all were seen)."""
        if len(self._latest) < self.samples_in.partitions:
            return None
        return min(self._latest.values())

    def step(self, timeout: float = 0.0) -> int:
        """One poll of each input, join, publish, commit what has fully left; returns rows published."""
        self._tick += 1
        s_tab, s_cur = self.samples_in.poll(self.poll_rows, timeout)
        g_tab, g_cur = self.signals_in.poll(self.poll_rows, 0.0)
        for p, t in s_cur.event_time_max.items():
            self._latest[p] = max(self._latest.get(p, t), t)
        s_tab, g_tab = self._checked_samples(s_tab), self._checked_signals(g_tab)
        now = self.clock()
        # the clock may expire samples only when no backlog is left on either input: a signal still unread there
        # could be on time
        clock_wm = now if self.clock_watermark and s_cur.caught_up and g_cur.caught_up else None
        out = self.core.step(s_tab, g_tab, self.watermark(), now, tick=self._tick, clock_watermark_ms=clock_wm)
        for stream, cur in ((self.samples_in, s_cur), (self.signals_in, g_cur)):
            if not cur.empty:
                self._uncommitted.append((self._tick, stream, cur))
        self.rows_in += s_cur.rows + g_cur.rows
        return self._publish(out)

    def _checked_samples(self, table: pa.Table | None) -> pa.Table | None:
        """The samples, cast to the columns of the first sample table (which fixed the joined schema); a table that
        cannot be is dead-lettered whole on the sample stream (counted)."""
        schema = self.core.out_schema
        if table is None or not table.num_rows:
            return table
        if schema is not None:
            want = pa.schema(list(schema)[:len(schema) - len(SIGNAL_COLUMNS) - 1])
            try:
                table = table if table.schema.equals(want) else table.select(want.names).cast(want)
            except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
                reason = f"sample columns do not fit the first sample table's ({type(e).__name__}: {e})"
                self.core.counts.malformed_samples += dead_letter_all(table, reason, self.samples_in, "joiner")
                return None
        if self._sample_check is None:
            self._sample_check = RecordCheck(labels=[n for n in table.column_names if n.startswith("label_")])
        table, bad = split_malformed(table, self._sample_check, self.samples_in, "joiner")
        self.core.counts.malformed_samples += bad
        return table if table.num_rows else None

    def _checked_signals(self, table: pa.Table | None) -> pa.Table | None:
        """The signals with `num_tasks` logits each, cast to the signal schema; the others are dead-lettered on the
        signal stream (counted)."""
        if table is None or not table.num_rows:
            return table
        table, bad = split_malformed(table, self._signal_check, self.signals_in, "joiner")
        self.core.counts.malformed_signals += bad
        want = self._signal_schema
        if not table.num_rows or table.schema.field("logits").type == want.field("logits").type:
            return table if table.num_rows else None
        try:
            i = table.schema.get_field_index("logits")
            return table.set_column(i, want.field("logits"), table.column(i).cast(want.field("logits").type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            reason = f"logits of type {table.schema.field('logits').type} do not cast to the signal schema's: {e}"
            self.core.counts.malformed_signals += dead_letter_all(table, reason, self.signals_in, "joiner")
            return None

    def drain(self) -> int:
        """Step until a step takes in nothing (both inputs caught up); returns rows published."""
        published, before = 0, -1
        while self.rows_in != before:
            before = self.rows_in
            published += self.step()
        return published

    def flush(self, watermark_ms: int) -> int:
        """Advance the watermark to `watermark_ms` with no new input (end of a stream or day: everything due goes
        out, label-only where no signal came); returns rows published."""
        self._tick += 1
        return self._publish(self.core.step(None, None, watermark_ms, self.clock(), tick=self._tick))

    def _publish(self, out: pa.Table | None) -> int:
        """Append the joined rows to the output stream, then commit the inputs that have fully left."""
        if out is not None:
            self.out.append(out)
            self.rows_out += out.num_rows
        self._commit_done()
        return 0 if out is None else out.num_rows

    def _commit_done(self) -> None:
        """Commit, in order, the cursors of ticks older than every row still waiting in the core."""
        live = self.core.min_live_tick()
        while self._uncommitted and (live is None or self._uncommitted[0][0] < live):
            _, stream, cur = self._uncommitted.popleft()
            stream.commit(cur)

    def metrics(self) -> dict[str, float | int | None]:
        """The core's metrics plus the consumer lag of both inputs (rows)."""
        return {**self.core.metrics(self.clock()), "join/rows_out": self.rows_out,
                "join/sample_lag_rows": self.samples_in.lag(), "join/signal_lag_rows": self.signals_in.lag()}
