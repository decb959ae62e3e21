"""Redis backend reliability against a real redis-server: a dead consumer's entries taken over (XAUTOCLAIM),
malformed entries dead-lettered with their id while consumption goes on, poison entries dead-lettered after N
deliveries, retention, and kill -9 of the server mid-stream with an AOF restart in which the producer re-sends what
the server lost (the `appendfsync everysec` window, made real by cutting the AOF's tail)."""

import os
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from recdistill.streams.base import DuplicateFilter, StreamError, column_np
from recdistill.streams.redis import RedisStream, ServerRestarted, encode
from recdistill.streams.server import RedisServer


def ids_of(table):
    return set(column_np(table, "sample_id").tolist()) if table is not None else set()


def test_dead_consumer_entries_are_claimed(redis_server, sample_rows):
    # idle times are generous against a loaded machine's scheduling pauses
    a = RedisStream(redis_server.url, "claim", consumer="a", entry_rows=50, claim_idle_ms=400)
    b = RedisStream(redis_server.url, "claim", consumer="b", entry_rows=50, claim_idle_ms=400)
    a.append(sample_rows(0, 200))
    lost, _ = a.poll(100)  # consumer a takes 100 rows and dies without committing
    got, cur = b.poll(1000)
    assert ids_of(got) == set(range(100, 200))  # b gets the undelivered rows at once
    b.commit(cur)
    assert b.poll(1000)[0] is None  # a's entries are not idle long enough yet
    time.sleep(0.45)
    claimed, cur = b.poll(1000)
    assert ids_of(claimed) == ids_of(lost) == set(range(100))
    b.commit(cur)
    assert b.lag() == 0 and b.pending() == 0


def test_malformed_entry_is_dead_lettered_and_consumption_goes_on(redis_server, sample_rows, caplog):
    s = RedisStream(redis_server.url, "bad", entry_rows=50)
    s.append(sample_rows(0, 50))
    bad_id = s.client.xadd(s.keys[0], {"b": b"not arrow at all", "n": 7}).decode()
    no_keys = pa.table({"sample_id": [1]})  # valid Arrow, but without the key columns
    nokey_id = s.client.xadd(s.keys[0], {"b": encode(no_keys), "n": 1}).decode()
    s.append(sample_rows(50, 100))
    got = []
    with caplog.at_level("WARNING"):
        while (t := s.poll(1000))[0] is not None:
            got.append(t[0])
            s.commit(t[1])
    assert ids_of(pa.concat_tables(got)) == set(range(100))
    reasons = {eid: reason for _, eid, reason in s.dead_lettered}
    assert set(reasons) == {bad_id, nokey_id}
    assert bad_id in reasons[bad_id] and "not an Arrow IPC" in reasons[bad_id]
    assert "event_time_ms" in reasons[nokey_id]
    assert bad_id in caplog.text and nokey_id in caplog.text
    dead = s.client.xrange(s.dead_key)
    assert [f[b"id"].decode() for _, f in dead] == [bad_id, nokey_id]
    assert dead[0][1][b"b"] == b"not arrow at all"  # the payload is kept for inspection
    assert s.pending() == 0


def test_poison_entry_dead_lettered_after_n_deliveries(redis_server, sample_rows):
    s = RedisStream(redis_server.url, "poison", entry_rows=10, dead_letter_after=2)
    s.append(sample_rows(0, 10))
    deliveries = 0
    for _ in range(5):  # the consumer dies on this entry each time, before commit
        t, _ = s.poll(10)
        if t is None:
            break
        deliveries += 1
        s = RedisStream(redis_server.url, "poison", entry_rows=10, dead_letter_after=2)
    assert deliveries == 2
    assert len(s.dead_lettered) == 1 and "delivered 3 times" in s.dead_lettered[0][2]
    assert s.pending() == 0 and s.lag() == 0


def test_maxlen_retention_trims(redis_server, sample_rows):
    s = RedisStream(redis_server.url, "trim", entry_rows=10, maxlen=20)
    for lo in range(0, 2000, 100):
        s.append(sample_rows(lo, lo + 100))
    # MAXLEN ~ trims whole radix-tree nodes (100 entries by default), so "about 20" is at most a node more.
    assert 20 <= s.entries() <= 20 + 100 < 200


def _cut_aof_tail(directory: str, fraction: float) -> int:
    """Drop the last `fraction` of the AOF: the writes a crash inside the fsync window loses. Returns bytes cut."""
    path = os.path.join(directory, "appendonly.aof")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * (1 - fraction)))
    return size - int(size * (1 - fraction))


def _producer(url, source, batch_rows, acked, stop):
    """Appends `source` in order; on a failure (connection lost, or ServerRestarted) waits, asks the stream for its
    high water and re-sends from its own checkpoint, the position after it. `acked` records each confirmed append."""
    prod = RedisStream(url, "crash", partitions=2, producer_id="p1", entry_rows=100)
    pos = 0
    while pos < source.num_rows and not stop.is_set():
        try:
            prod.append(source.slice(pos, batch_rows))
            pos += batch_rows
            acked.append(pos - 1)
            time.sleep(0.002)  # a live source, not a bulk load: the kill lands mid-stream
        except Exception:
            time.sleep(0.05)
            try:
                pos = prod.producer_high_water() + 1  # seq == row index of the source
                acked.append(("resend_from", pos))
            except Exception:
                continue
    prod.close()


def test_kill9_mid_stream_aof_restart_producer_resends(tmp_path, sample_rows):
    server = RedisServer(dir=str(tmp_path / "redis")).start()
    source = sample_rows(0, 20_000)
    acked, stop = [], threading.Event()
    th = threading.Thread(target=_producer, args=(server.url, source, 100, acked, stop), daemon=True)
    consumer = RedisStream(server.url, "crash", partitions=2, group="students", consumer="s1", entry_rows=100)
    dedup, delivered = DuplicateFilter(horizon_ms=10**12), 0
    try:
        th.start()
        while len(acked) < 30:
            time.sleep(0.01)
        t, cur = consumer.poll(1000)
        consumer.commit(cur)
        dedup(t)
        delivered += t.num_rows
        server.kill()
        acked_at_kill = max(a for a in acked if isinstance(a, int))
        assert _cut_aof_tail(server.dir, 0.3) > 0
        server.start()
        th.join(timeout=60)
        assert not th.is_alive()
        resends = [a[1] for a in acked if isinstance(a, tuple)]
        # The server lost appends it had confirmed, and the producer re-sent them from its checkpoint.
        assert resends and min(resends) <= acked_at_kill
        while True:
            t, cur = consumer.poll(5000, timeout=0.2)
            if t is None:
                break
            delivered += t.num_rows
            dedup(t)
            consumer.commit(cur)
        unique = delivered - dedup.dropped
        assert unique == source.num_rows  # every row arrived ...
        assert dedup.seen.contains(np.arange(source.num_rows)).all()  # ... each id once after dedup
        assert consumer.pending() == 0
    finally:
        stop.set()
        consumer.close()
        server.close()


def test_minid_retention_trims_by_age(redis_server, sample_rows):
    s = RedisStream(redis_server.url, "age", entry_rows=1)
    s.append(sample_rows(0, 300))  # 300 entries
    time.sleep(0.05)
    s.retention_ms = 20
    s.append(sample_rows(300, 301))
    # MINID ~ drops whole radix-tree nodes (100 entries) older than now - 20 ms; the newest entry stays.
    assert 1 <= s.entries() <= 101


def test_idle_producer_learns_of_the_restart_and_resends(tmp_path, sample_rows):
    server = RedisServer(dir=str(tmp_path / "redis")).start()
    try:
        prod = RedisStream(server.url, "idle", producer_id="p", entry_rows=100)
        for lo in range(0, 2000, 100):
            prod.append(sample_rows(lo, lo + 100))  # all confirmed
        server.kill()
        _cut_aof_tail(server.dir, 0.25)  # the crash lost the last confirmed appends
        server.start()
        with pytest.raises(ServerRestarted):
            prod.append(sample_rows(2000, 2100))  # nothing appended: the gap must not be hidden
        hw = prod.producer_high_water()
        assert 0 <= hw < 1999
        prod.append(sample_rows(hw + 1, 2100))  # re-send from the checkpoint, then carry on
        cons = RedisStream(server.url, "idle", consumer="c", entry_rows=100)
        got = [t for t in iter(lambda: cons.poll(5000)[0], None)]
        assert sorted(column_np(pa.concat_tables(got), "sample_id").tolist()) == list(range(2100))
    finally:
        server.close()


def test_private_server_from_config(sample_rows):
    from recdistill.config import StreamConfig
    from recdistill.streams import open_stream, stream_server

    cfg = StreamConfig(backend="redis", start_server=True, redis_url="redis://127.0.0.1:1/0")  # never dialled
    with stream_server(cfg) as url:
        assert url != cfg.redis_url
        with open_stream(cfg, "private", url=url) as s:
            s.append(sample_rows(0, 10))
            assert s.poll(100)[0].num_rows == 10
    with pytest.raises(StreamError, match="private"):  # the server is gone with the block
        s.append(sample_rows(10, 20))


def test_a_poll_of_only_dead_letters_looks_further(redis_server, sample_rows):
    s = RedisStream(redis_server.url, "allbad", entry_rows=50)
    for _ in range(3):
        s.client.xadd(s.keys[0], {"b": b"garbage"})
    s.append(sample_rows(0, 50))
    t, _ = s.poll(50)  # the first entries read are all malformed: the same poll goes on to the good one
    assert t is not None and t.num_rows == 50 and len(s.dead_lettered) == 3


def test_live_consumer_keeps_its_uncommitted_entries(redis_server, sample_rows):
    """A student commits only at its checkpoint, long after the poll: its heartbeats keep other consumers off the
    entries it holds, it is never handed them twice, and once it stops they are claimed."""
    a = RedisStream(redis_server.url, "live", consumer="a", entry_rows=50, claim_idle_ms=500)
    b = RedisStream(redis_server.url, "live", consumer="b", entry_rows=50, claim_idle_ms=500)
    a.append(sample_rows(0, 150))
    held, _ = a.poll(50)
    for _ in range(12):  # 0.6 s, longer than the claim idle time, without committing; a only heartbeats
        time.sleep(0.05)
        a._next_beat = 0.0  # beat now, whatever the interval (keeps the test independent of scheduling)
        a.heartbeat()
        b_rows, _ = b.poll(1000)
        assert not ids_of(b_rows) & ids_of(held)  # b does not take them over
    time.sleep(0.6)  # a is silent now: its entries go idle; its own next poll must not hand them out again
    t, _ = a.poll(1000)
    assert not ids_of(t) & ids_of(held)
    time.sleep(0.6)
    claimed, _ = b.poll(1000)
    assert ids_of(held) <= ids_of(claimed)  # ... and b takes them over


def test_each_student_population_gets_every_row(redis_server, sample_rows):
    """One joined stream, N student groups: each group sees all rows, with its own lag; consumers within a group
    share them."""
    s = RedisStream(redis_server.url, "fanout", partitions=2, entry_rows=25)
    s.append(sample_rows(0, 200))
    groups = {g: [RedisStream(redis_server.url, "fanout", partitions=2, group=g, consumer=c, entry_rows=25)
                  for c in ("c1", "c2")] for g in ("small", "wide")}
    for g, consumers in groups.items():
        got = []
        for c in consumers * 10:  # the group's two consumers take turns
            t, cur = c.poll(30)
            if t is not None:
                got.append(column_np(t, "sample_id"))
                c.commit(cur)
        ids = np.concatenate(got)
        assert sorted(ids.tolist()) == list(range(200)), g  # every row once per group
        assert consumers[0].lag() == 0
    assert groups["small"][0].lag() == 0 and RedisStream(redis_server.url, "fanout", 2, group="new").lag() == 200


def test_consumer_waits_for_a_restarted_server_and_fails_clearly_if_it_never_returns(tmp_path, sample_rows):
    server = RedisServer(dir=str(tmp_path / "redis")).start()
    try:
        RedisStream(server.url, "gone", entry_rows=10).append(sample_rows(0, 50))
        c = RedisStream(server.url, "gone", consumer="c", entry_rows=10, reconnect_s=20)
        t, cur = c.poll(20)
        server.kill()
        threading.Timer(0.5, server.start).start()  # back on the same port, from its AOF
        c.commit(cur)  # waits for the server, then acknowledges
        got = [t]
        while (r := c.poll(100))[0] is not None:
            got.append(r[0])
            c.commit(r[1])
        assert sorted(column_np(pa.concat_tables(got), "sample_id").tolist()) == list(range(50))
        assert c.reconnects == 1 and c.lag() == 0
        server.kill()  # and now it stays down
        c.reconnect_s = 0.5
        t0 = time.monotonic()
        with pytest.raises(StreamError, match=r"did not come back within 0.5 s") as e:
            c.poll(100)
        assert 0.5 <= time.monotonic() - t0 < 5 and server.url in str(e.value)
    finally:
        server.close()
