"""The joiner on event time with a fake clock (deterministic): on-time joins in either arrival order, expiry to
label-only, late signals counted and kept but never joined (also not twice), duplicates on both inputs, NaN logits
passed through, the bounded buffer, a watermark that a stalled teacher does not hold back, latency metrics, and the
streamed joiner end to end over the local backend with a crash before its commit (every sample out, counts reconcile).
"""

import os

import numpy as np
import pyarrow as pa
import pytest

from recdistill.config import StreamConfig
from recdistill.streams.base import (
    DuplicateFilter,
    column_np,
    joined_schema,
    sample_schema,
    signal_schema,
    version_column,
)
from recdistill.streams.joiner import JoinCore, Joiner, match_ids
from recdistill.streams.local import LocalStream
from recdistill.streams.redis import RedisStream, ServerRestarted
from recdistill.streams.server import RedisServer

T = 2  # tasks
DELAY = 100  # ms of event time a sample waits for its signal


def signals(ids, t0=1_000, step_ms=10, step=7, logits=None):
    """Teacher-signal rows for `ids`, event time as make_samples gives the same ids, logits = [id, -id] unless
    given."""
    ids = np.asarray(ids, np.int64)
    if logits is None:
        logits = np.stack([ids, -ids], 1).astype(np.float32)
    flat = pa.array(np.asarray(logits, np.float32).reshape(-1))
    return pa.table({"sample_id": ids, "event_time_ms": t0 + ids * step_ms, "seq": ids,
                     "logits": pa.FixedSizeListArray.from_arrays(flat, T),
                     "teacher_step": pa.array(np.full(len(ids), step, np.int64)),
                     "teacher_version": version_column("v1", len(ids))})


def samples_of(ids):
    """Sample rows for `ids` as the conftest's sample_rows makes them (event time 1000 + 10 * id)."""
    ids = np.asarray(ids, np.int64)
    return pa.table({"sample_id": ids, "event_time_ms": 1_000 + ids * 10, "seq": ids,
                     "day": pa.array(np.zeros(len(ids), np.int32)),
                     "label_ctr": pa.array((ids % 3 == 0).astype(np.float32))})


def by_id(table):
    return {r["sample_id"]: r for r in table.to_pylist()} if table is not None else {}


def core(**kw):
    late = []
    c = JoinCore(T, DELAY, late_sink=late.append, **kw)
    return c, late


def test_on_time_join_either_order():
    c, late = core()
    out1 = c.step(samples_of([0, 1, 2]), signals([1, 5]), watermark_ms=None, now_ms=2_000)  # 5: signal first
    assert sorted(by_id(out1)) == [1]
    out2 = c.step(samples_of([3, 4, 5]), signals([0, 2]), watermark_ms=None, now_ms=2_010)
    rows = {**by_id(out1), **by_id(out2)}
    assert sorted(rows) == [0, 1, 2, 5]
    for i, r in rows.items():
        assert r["has_signal"] and r["logits"] == [float(i), float(-i)] and r["teacher_step"] == 7
        assert r["label_ctr"] == float(i % 3 == 0) and r["teacher_version"] == "v1"
    assert c.counts.joined == 4 and not late
    assert len(c.samples) == 2 and len(c.signals) == 0  # 3 and 4 still wait (no watermark yet)


def test_expiry_goes_label_only_then_late_signal_is_kept_not_joined():
    c, late = core()
    t3 = 1_000 + 3 * 10
    assert c.step(samples_of([3]), None, watermark_ms=t3 + DELAY - 1, now_ms=0) is None  # not due yet
    out = c.step(None, None, watermark_ms=t3 + DELAY, now_ms=5_000)
    (row,) = out.to_pylist()
    assert row["sample_id"] == 3 and not row["has_signal"]
    assert row["logits"] is None and row["teacher_step"] is None and row["label_ctr"] == 1.0
    assert c.counts.expired == 1
    assert c.step(None, signals([3]), watermark_ms=t3 + DELAY, now_ms=5_001) is None  # late: not joined
    assert c.counts.late == 1 and column_np(late[0], "sample_id").tolist() == [3]
    assert c.step(samples_of([3]), signals([3]), watermark_ms=t3 + DELAY, now_ms=5_002) is None  # redeliveries
    assert c.counts.duplicate_samples == 1 and c.counts.duplicate_signals == 1 and c.counts.late == 1
    assert c.counts.joined == 0


def test_signal_polled_with_the_watermark_that_passes_it_is_on_time():
    c, late = core()
    c.step(samples_of([0]), None, watermark_ms=None, now_ms=0)
    out = c.step(samples_of([50]), signals([0]), watermark_ms=1_000 + 50 * 10, now_ms=0)
    assert column_np(out, "sample_id").tolist() == [0] and column_np(out, "has_signal").all()
    assert c.counts.late == 0 and c.counts.expired == 0 and not late


def test_signal_without_sample_expires_late():
    c, late = core()
    c.step(samples_of([0]), signals([40]), watermark_ms=1_000, now_ms=0)
    assert not late
    c.step(None, None, watermark_ms=1_000 + 40 * 10 + DELAY, now_ms=0)
    assert c.counts.late == 1 and column_np(late[0], "sample_id").tolist() == [40]
    assert c.counts.expired == 1  # sample 0 expired on the way


def test_duplicates_in_and_across_batches():
    c, _ = core()
    out = [c.step(samples_of([1, 1, 2, 2, 3]), signals([2, 2, 9]), None, 0),
           c.step(samples_of([2, 3, 4]), signals([1, 2, 3, 3, 4]), None, 0)]
    ids = [r["sample_id"] for t in out if t is not None for r in t.to_pylist()]
    assert sorted(ids) == [1, 2, 3, 4]
    assert c.counts.duplicate_samples == 2 + 2 and c.counts.duplicate_signals == 1 + 2


def test_nan_logits_pass_through():
    c, _ = core()
    nan = np.array([[np.nan, 1.0], [np.inf, -np.inf]], np.float32)
    out = c.step(samples_of([0, 1]), signals([0, 1], logits=nan), None, 0)
    got = np.stack([np.array(r["logits"], np.float32) for r in sorted(out.to_pylist(), key=lambda r: r["sample_id"])])
    np.testing.assert_array_equal(got, nan)  # the student rejects non-finite logits, the joiner does not judge
    assert column_np(out, "has_signal").all()


def test_bounded_buffer_evicts_oldest_label_only():
    c, late = core(buffer_rows=5)
    out = c.step(samples_of(list(range(8))), signals([20, 21, 22, 23, 24, 25, 26]), None, 0)
    assert sorted(column_np(out, "sample_id").tolist()) == [0, 1, 2]  # the oldest samples went out early
    assert not column_np(out, "has_signal").any() and c.counts.evicted == 3
    assert c.counts.signals_dropped == 2 and column_np(late[0], "sample_id").tolist() == [20, 21]
    assert len(c.samples) == len(c.signals) == 5


def test_watermark_is_min_over_sample_partitions_and_ignores_stalled_teacher(tmp_path):
    root = str(tmp_path)
    samples, sigs, out = (LocalStream(root, n, partitions=2) for n in ("samples", "signals", "joined"))
    j = Joiner.from_config(StreamConfig(max_delay_s=DELAY / 1000), samples, sigs, out, num_tasks=T)
    j.clock = lambda: 0
    samples.append(samples_of([0, 2, 4]))  # partition 0 only
    j.step()
    assert j.watermark() is None  # partition 1 not seen: nothing can expire yet
    samples.append(samples_of([1, 3, 5, 99]))  # 99 is odd: partition 1 reaches t(99); partition 0 stays at t(4)
    j.step()
    assert j.watermark() == 1_000 + 4 * 10
    samples.append(samples_of([100]))  # partition 0 moves on; the signal stream stays empty (teacher stalled)
    j.step()
    assert j.watermark() == 1_000 + 99 * 10
    got = LocalStream(root, "joined", partitions=2)
    rows = pa.concat_tables(iter(lambda: got.poll(1000)[0], None))
    # everything due under the watermark went out with labels only; 99 and 100 still wait
    assert sorted(column_np(rows, "sample_id").tolist()) == [0, 1, 2, 3, 4, 5]
    assert not column_np(rows, "has_signal").any() and j.core.counts.expired == 6


def test_latency_metrics_follow_the_clock():
    c, _ = core()
    c.step(samples_of([0, 1, 2, 3]), None, None, now_ms=0)
    c.step(None, signals([0, 1, 2, 3]), watermark_ms=1_020, now_ms=1_100)  # event times 1000..1030
    m = c.metrics(now_ms=1_100)
    assert m["join/latency_p50_ms"] == pytest.approx(np.percentile([100, 90, 80, 70], 50))
    assert m["join/latency_p99_ms"] == pytest.approx(np.percentile([100, 90, 80, 70], 99))
    assert m["join/join_rate"] == 1.0 and m["join/watermark_lag_ms"] == 80


def _feed(make, n, rng):
    """Samples 0..n-1 and signals for 80% of them, in shuffled batches, a tenth of each re-delivered."""
    samples, sigs = make("samples", 2), make("signals", 2)
    have = np.sort(rng.choice(n, int(n * 0.8), replace=False))
    for lo in range(0, n, 500):
        ids = np.arange(lo, min(n, lo + 500))
        samples.append(samples_of(ids))
        hi = n if lo + 500 >= n else lo + 300  # signals run up to 200 ids behind their samples
        sig = have[(have >= lo - 200) & (have < hi)]
        if len(sig):
            sigs.append(signals(rng.permutation(sig)))
        dup = rng.choice(ids, len(ids) // 10, replace=False)
        samples.append(samples_of(dup))
    return have


def test_streamed_join_with_crash_before_commit_reconciles(make_stream):
    """Both backends: a joiner that dies before committing is replaced by one resumed from the committed input
    positions (local: offsets from its checkpoint state; redis: the group's pending entries); the student side sees
    every sample once after dropping duplicates, with its signal exactly when the teacher made one."""
    n, rng = 6_000, np.random.default_rng(0)
    tag = np.random.default_rng().integers(1 << 30)
    make = lambda name, parts: make_stream(f"{name}-{tag}", parts)  # noqa: E731
    have = _feed(make, n, rng)
    ins, out = [make("samples", 2), make("signals", 2)], make("joined", 1)
    j = Joiner(*ins, out, num_tasks=T, max_delay_ms=10_000, poll_rows=700, clock=lambda: 0)
    for _ in range(5):
        j.step()
    # the joiner dies here: its input offsets are those committed, which the new one resumes from
    ins2 = [make("samples", 2), make("signals", 2)]
    for s, old in zip(ins2, ins, strict=True):
        s.load_state_dict(old.state_dict())
    j2 = Joiner(*ins2, out, num_tasks=T, max_delay_ms=10_000, poll_rows=700, clock=lambda: 0)
    j2.drain()
    # the last samples wait for a watermark that never passes them: close the day with a far watermark
    j2.flush(10**12)
    assert ins2[0].lag() == ins2[1].lag() == 0  # all committed once nothing waits in the joiner
    student = make("joined", 1)
    dedup = DuplicateFilter(horizon_ms=10**12)
    rows = pa.concat_tables([dedup(t) for t in iter(lambda: student.poll(5000)[0], None)])
    ids, has = column_np(rows, "sample_id"), column_np(rows, "has_signal")
    np.testing.assert_array_equal(np.sort(ids), np.arange(n))  # every sample went out exactly once after dedup
    np.testing.assert_array_equal(np.sort(ids[has]), have)  # with its signal iff the teacher made one
    assert dedup.dropped > 0  # the crash made the new joiner re-publish rows the first had already published
    logits = rows.filter(pa.array(has)).column("logits").combine_chunks().flatten().to_numpy().reshape(-1, T)
    np.testing.assert_array_equal(logits[:, 0], ids[has])  # each sample got its own signal


def test_dedup_memory_is_bounded_and_old_redeliveries_are_stale():
    c, _ = core(dedup_horizon_ms=2 * DELAY)
    for lo in range(0, 20_000, 500):  # 200 s of event time, 10 ms per id
        ids = np.arange(lo, lo + 500)
        c.step(samples_of(ids), signals(ids), watermark_ms=1_000 + int(ids[-1]) * 10, now_ms=0)
    # ids are remembered for about the horizon (20 ids per 200 ms) plus a batch of chunk slack, not all 20000
    assert len(c.seen_samples) <= 4 * 500 and len(c.seen_signals) <= 4 * 500
    c.step(samples_of([5]), signals([5]), watermark_ms=None, now_ms=0)  # a re-delivery from long ago
    assert c.counts.stale == 1 and c.counts.late == 1 and c.counts.joined == 20_000


def test_plain_string_versions_are_accepted():
    c, _ = core()
    plain = signals([0]).set_column(5, "teacher_version", pa.array(["v2"]))
    out = c.step(samples_of([0, 1]), pa.concat_tables([plain]), None, 0)
    out2 = c.step(None, signals([1]), None, 0)  # dictionary-encoded, as the schema has it
    assert [r["teacher_version"] for r in (out.to_pylist() + out2.to_pylist())] == ["v2", "v1"]


def test_output_has_the_joined_schema_of_the_sample_schema():
    tasks = ["ctr", "watch_time"]
    schema = sample_schema(tasks)
    ids = np.arange(4, dtype=np.int64)
    rows = pa.table({"sample_id": ids, "event_time_ms": 1_000 + ids * 10, "seq": ids,
                     "day": pa.array(np.zeros(4, np.int32)), "traffic": pa.array(np.ones(4, np.int32)),
                     "label_ctr": pa.array(np.ones(4, np.float32)),
                     "label_watch_time": pa.array(np.ones(4, np.float32))},
                    schema=schema)
    c, _ = core()
    out = c.step(rows, signals([0, 1]), watermark_ms=None, now_ms=0)
    tail = c.step(None, None, watermark_ms=10**9, now_ms=0)
    want = joined_schema(schema, T)
    assert out.schema.equals(want) and tail.schema.equals(want)
    assert want.field("logits").type == signal_schema(T).field("logits").type and want.field("logits").nullable
    assert column_np(out, "has_signal").tolist() == [True, True]
    assert column_np(tail, "has_signal").tolist() == [False, False]


def _append_or_resend(stream, source, lo, hi, batch=500):
    """Append source rows lo..hi-1 in batches; after a server restart re-send from the producer's high water."""
    pos = lo
    while pos < hi:
        try:
            stream.append(source.slice(pos, min(batch, hi - pos)))
            pos += batch
        except ServerRestarted:
            pos = stream.producer_high_water() + 1  # seq == row index of the source


def test_redis_kill9_under_the_joiner_loses_no_joined_sample(tmp_path):
    """Samples, signals and the joined stream on one redis-server, killed with the AOF's tail cut (the appendfsync
    window) between two stretches of joining: producers re-send from their high water, a new joiner resumes from
    the group's pending entries, and the students still get every sample with its signal."""
    n = 4_000
    ids = np.arange(n)
    src_s, src_g = samples_of(ids), signals(ids)
    server = RedisServer(dir=str(tmp_path / "redis")).start()
    try:
        def streams():
            kw = {"partitions": 2, "entry_rows": 100}
            return (RedisStream(server.url, "samples", producer_id="ps", **kw),
                    RedisStream(server.url, "signals", producer_id="pg", **kw),
                    RedisStream(server.url, "joined", producer_id="joiner", **kw))

        s_prod, g_prod, _ = streams()
        _append_or_resend(s_prod, src_s, 0, 2_500)
        _append_or_resend(g_prod, src_g, 0, 2_500)
        Joiner(*streams(), num_tasks=T, max_delay_ms=10**9, poll_rows=700, clock=lambda: 0).drain()
        published = streams()[2].entries()
        server.kill()
        _cut_aof_tail(server.dir, 0.3)
        server.start()
        assert streams()[2].entries() < published  # the crash lost joined entries the joiner had published
        _append_or_resend(s_prod, src_s, 2_500, n)  # first raises ServerRestarted, then re-sends what was lost
        _append_or_resend(g_prod, src_g, 2_500, n)
        joiner = Joiner(*streams(), num_tasks=T, max_delay_ms=10**9, poll_rows=700, clock=lambda: 0)
        joiner.drain()
        joiner.flush(10**12)
        student = RedisStream(server.url, "joined", partitions=2, group="students", consumer="s")
        dedup = DuplicateFilter(horizon_ms=10**12)
        rows = pa.concat_tables([dedup(t) for t in iter(lambda: student.poll(10_000)[0], None)])
        np.testing.assert_array_equal(np.sort(column_np(rows, "sample_id")), ids)
        assert column_np(rows, "has_signal").all()  # nothing lost on the signal side either
    finally:
        server.close()


def _cut_aof_tail(directory, fraction):
    path = os.path.join(directory, "appendonly.aof")
    size = os.path.getsize(path)
    os.truncate(path, int(size * (1 - fraction)))


@pytest.mark.parametrize("sizes", [(0, 5), (5, 0), (3, 50), (50, 3), (40, 40)])
def test_match_ids_pairs_equal_ids_whichever_side_is_longer(sizes):
    rng = np.random.default_rng(sum(sizes))
    a = rng.permutation(100)[:sizes[0]].astype(np.int64)
    b = rng.permutation(100)[:sizes[1]].astype(np.int64)
    ia, ib = match_ids(a, b)
    np.testing.assert_array_equal(a[ia], b[ib])
    assert set(a[ia].tolist()) == set(a.tolist()) & set(b.tolist())


def test_malformed_inputs_are_dead_lettered_and_the_join_goes_on(make_stream, caplog):
    """Both backends: a sample table without a column of the first one, signals with the wrong number of logits or
    none, and a signal table without teacher_step go to the dead letters of the stream that brought them, by id; every
    good sample still goes out, with its signal where a good one came."""
    tag = np.random.default_rng().integers(1 << 30)
    s_in, g_in, out = (make_stream(f"{n}-{tag}") for n in ("samples", "signals", "joined"))
    s_in.append(samples_of(range(0, 20)))
    s_in.append(samples_of(range(20, 25)).drop_columns(["label_ctr"]))  # another producer's table
    s_in.append(samples_of(range(25, 40)))
    g_in.append(signals(range(0, 10)))
    short = signals([10, 11]).to_pydict()
    short["logits"] = [[1.0], None]  # one logit for two tasks; no logits at all
    g_in.append(pa.Table.from_pydict(short, schema=signals([10]).schema.set(
        3, pa.field("logits", pa.list_(pa.float32())))))
    g_in.append(signals(range(12, 30)).drop_columns(["teacher_step"]))
    g_in.append(signals(range(30, 40)))
    j = Joiner(s_in, g_in, out, num_tasks=T, max_delay_ms=DELAY, poll_rows=1000, clock=lambda: 0)
    with caplog.at_level("WARNING"):
        j.drain()
        j.flush(10**12)
    m = j.metrics()
    assert m["join/malformed_samples"] == 5 and m["join/malformed_signals"] == 2 + 18
    student = make_stream(f"joined-{tag}")
    rows = pa.concat_tables([t for t in iter(lambda: student.poll(1000)[0], None)])
    ids, has = column_np(rows, "sample_id"), column_np(rows, "has_signal")
    assert sorted(ids.tolist()) == [*range(20), *range(25, 40)]
    assert sorted(ids[has].tolist()) == [*range(10), *range(30, 40)]
    dead_s = pa.concat_tables([d["rows"] for d in s_in.dead_letters()])
    assert column_np(dead_s, "sample_id").tolist() == list(range(20, 25))
    assert "label_ctr" in dead_s.column("dead_reason")[0].as_py()
    why = {i: r for d in g_in.dead_letters() for i, r in zip(column_np(d["rows"], "sample_id").tolist(),
                                                             d["rows"].column("dead_reason").to_pylist(), strict=True)}
    assert sorted(why) == [10, 11, *range(12, 30)] and "2 values" in why[10] and "teacher_step" in why[12]
    assert "sample_id 10: logits missing or not 2 values" in caplog.text
    assert s_in.lag() == g_in.lag() == 0  # dead letters are committed with their polls


def test_clock_watermark_expires_on_time_only_without_backlog(tmp_path):
    """Event times on the clock (a live stream): the data watermark trails it (the newest sample polled is at 1090,
    the clock at 1200), so only the clock watermark expires the samples due by 1200, and only once both inputs are
    caught up: a signal still unread in a backlog may be on time. A producer far behind the clock loses nothing: its
    samples go out label-only, none dropped as stale."""
    def run(clock_watermark, now, n_signals=0, poll_rows=1000):
        tag = np.random.default_rng().integers(1 << 30)
        s_in, g_in, out = (LocalStream(str(tmp_path), f"{n}-{tag}") for n in ("s", "g", "j"))
        s_in.append(samples_of(range(10)))  # event times 1000 .. 1090
        if n_signals:
            g_in.append(signals(range(10, 10 + n_signals)))  # other samples' signals, a backlog to read first
            g_in.append(signals([3]))
        j = Joiner(s_in, g_in, out, num_tasks=T, max_delay_ms=DELAY, poll_rows=poll_rows, clock=lambda: now,
                   clock_watermark=clock_watermark)
        return j, j.step()

    j, published = run(False, now=1200)
    assert published == 0 and j.core.watermark_ms == 1090  # the data watermark is behind: nothing is due by it
    j, published = run(True, now=1200)
    assert published == 10 == j.core.counts.expired  # due by the clock: t + 100 <= 1200
    j, published = run(True, now=1150)
    assert published == 6  # 1000 .. 1050 are due, 1060 .. 1090 wait
    j, published = run(True, now=1200, n_signals=40, poll_rows=20)  # the signal poll is not caught up
    assert published == 0
    published += j.step() + j.step()  # the backlog is read: sample 3 meets its signal, the rest expire by the clock
    assert published == 10 and j.core.counts.joined == 1 and j.core.counts.expired == 9
    j, published = run(True, now=10**9)  # samples far behind the clock: label-only at once, none stale
    assert published == 10 and j.core.counts.stale == 0
