"""The stream interface contract (DESIGN §4 'Streams'), the same tests against both backends (local and a real
redis-server): append/poll/commit, at-least-once redelivery after a consumer crash before commit and none after,
duplicates dropped by sample id, seek by offset and by event time, lag, partition routing, blocking poll."""

import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from recdistill.streams.base import DuplicateFilter, StreamError, column_np
from recdistill.streams.validate import RecordCheck, split_malformed


def drain(stream, max_rows=100, commit=True):
    """Poll until empty; returns the concatenated rows (None if none)."""
    got = []
    while True:
        t, cur = stream.poll(max_rows)
        if t is None:
            break
        got.append(t)
        if commit:
            stream.commit(cur)
    return pa.concat_tables(got) if got else None


def restart(make, stream):
    """What a consumer process restarted from its checkpoint looks like: a new object, state loaded."""
    state = stream.state_dict()
    fresh = make(stream.name, stream.partitions)
    fresh.load_state_dict(state)
    return fresh


def test_round_trip_and_lag(make_stream, sample_rows):
    s = make_stream(partitions=3)
    s.append(sample_rows(0, 500))
    s.append(sample_rows(500, 700).to_batches()[0])  # a RecordBatch works as well as a Table
    assert s.lag() == 700
    t, cur = s.poll(250)
    assert t is not None and cur.rows == t.num_rows >= 250 - 64 * 3
    s.commit(cur)
    assert s.lag() == 700 - t.num_rows
    rest = drain(s)
    got = pa.concat_tables([t, rest])
    ids = np.sort(column_np(got, "sample_id"))
    np.testing.assert_array_equal(ids, np.arange(700))
    # Columns come back as they went in, matched by id.
    order = np.argsort(column_np(got, "sample_id"))
    np.testing.assert_array_equal(column_np(got, "label_ctr")[order], (np.arange(700) % 3 == 0).astype(np.float32))
    assert s.lag() == 0
    t, cur = s.poll(100)
    assert t is None and cur.empty


def test_partition_routing(make_stream, sample_rows):
    s = make_stream(partitions=4)
    s.append(sample_rows(0, 400))
    while True:
        t, cur = s.poll(64)
        if t is None:
            break
        ids = column_np(t, "sample_id")
        # each partition's rows are those with id % 4 == p, and the cursor's event-time maximum covers them
        assert set(cur.event_time_max) == set(np.unique(ids % 4).tolist())
        for p, tmax in cur.event_time_max.items():
            assert tmax == int(column_np(t, "event_time_ms")[ids % 4 == p].max())
        s.commit(cur)


def test_crash_before_commit_redelivers_after_commit_not(make_stream, sample_rows):
    s = make_stream(partitions=2)
    s.append(sample_rows(0, 300))
    first, cur = s.poll(100)
    s.commit(cur)
    second, _ = s.poll(100)  # handed out, never committed: the consumer "dies" here
    assert second is not None
    s2 = restart(make_stream, s)
    again = drain(s2)
    got = set(column_np(again, "sample_id").tolist())
    assert set(column_np(second, "sample_id").tolist()) <= got  # at-least-once: uncommitted rows come back
    assert not got & set(column_np(first, "sample_id").tolist())  # committed rows do not
    assert got | set(column_np(first, "sample_id").tolist()) == set(range(300))
    s3 = restart(make_stream, s2)
    assert drain(s3) is None  # all committed now: nothing comes back


def test_duplicates_dropped_by_sample_id(make_stream, sample_rows):
    s = make_stream(partitions=2)
    s.append(sample_rows(0, 200))
    s.append(sample_rows(100, 300))  # a producer re-sent 100..199 (at-least-once upstream)
    dedup = DuplicateFilter(horizon_ms=10**9)
    out = [dedup(t) for t in iter(lambda: s.poll(70)[0], None)]
    ids = column_np(pa.concat_tables(out), "sample_id")
    assert len(ids) == len(set(ids.tolist())) == 300
    assert dedup.dropped == 100


def test_seek_by_event_time_and_offset(make_stream, sample_rows):
    s = make_stream(partitions=2)
    for lo in range(0, 400, 100):
        s.append(sample_rows(lo, lo + 100))
    t_cut = 1_000 + 250 * 10  # event time of sample 250
    s.seek(event_time_ms=t_cut)
    ids = column_np(drain(s), "sample_id")
    np.testing.assert_array_equal(np.sort(ids), np.arange(250, 400))
    s.seek(offset=0)  # back to the start of every partition
    assert drain(s).num_rows == 400
    with pytest.raises(ValueError):
        s.seek()


def test_blocking_poll_wakes_on_append(make_stream, sample_rows):
    s = make_stream()
    t0 = time.monotonic()
    assert s.poll(10, timeout=0.2)[0] is None and time.monotonic() - t0 >= 0.15
    timer = threading.Timer(0.2, lambda: s.append(sample_rows(0, 5)))
    timer.start()
    t, _ = s.poll(10, timeout=5.0)
    timer.join()
    assert t is not None and t.num_rows == 5


def test_rows_without_keys_are_refused(make_stream, sample_rows):
    s = make_stream()
    with pytest.raises(StreamError, match="event_time_ms"):
        s.append(pa.table({"sample_id": [1, 2], "seq": [0, 1]}))
    with pytest.raises(StreamError, match="sample_id"):
        s.append(pa.table({"sample_id": pa.array([1, None], pa.int64()), "event_time_ms": [0, 1], "seq": [0, 1]}))
    assert s.lag() == 0


def test_open_stream_from_config(make_stream, sample_rows, tmp_path):
    from recdistill.config import StreamConfig
    from recdistill.streams import open_stream

    kw = {"backend": make_stream.backend, "path": str(tmp_path / "cfg"), "partitions": 3, "entry_rows": 7}
    if make_stream.backend == "redis":
        kw["redis_url"] = make_stream("probe").url
    with open_stream(StreamConfig(**kw), "from-config") as s:
        assert s.partitions == 3
        s.append(sample_rows(0, 50))
        assert s.lag() == 50


def test_rows_of_a_conflicting_schema_are_dead_lettered_not_fatal(make_stream, sample_rows):
    """A producer that wrote a column with another type: its rows are put aside with the reason, the rest of the
    poll comes through, and the poll's commit covers them (not delivered again)."""
    s = make_stream()
    s.append(sample_rows(0, 10))
    odd = sample_rows(10, 15)
    odd = odd.set_column(odd.schema.get_field_index("label_ctr"), "label_ctr", pa.array(["yes"] * 5))
    s.append(odd)
    s.append(sample_rows(15, 25))
    got = []
    while (t := s.poll(1000))[0] is not None:
        got.append(column_np(t[0], "sample_id"))
        s.commit(t[1])
    assert sorted(np.concatenate(got).tolist()) == [*range(10), *range(15, 25)]
    (dead,) = s.dead_letters()
    assert "schema does not fit" in dead["reason"]
    assert column_np(dead["rows"], "sample_id").tolist() == list(range(10, 15))
    assert s.dead_rows == 5 and s.lag() == 0


def test_malformed_rows_are_dead_lettered_with_their_ids(make_stream, sample_rows, caplog):
    s = make_stream()
    rows = sample_rows(0, 6)
    labels = rows.column("label_ctr").to_numpy().copy()
    labels[[1, 4]] = np.nan
    rows = rows.set_column(rows.schema.get_field_index("label_ctr"), "label_ctr", pa.array(labels))
    s.append(rows)
    t, cur = s.poll(100)
    with caplog.at_level("WARNING"):
        good, bad = split_malformed(t, RecordCheck(labels=["label_ctr"]), s, "test consumer")
    assert bad == 2 and column_np(good, "sample_id").tolist() == [0, 2, 3, 5]
    assert "sample_id 1: label_ctr is null, NaN or infinite" in caplog.text and "sample_id 4" in caplog.text
    (dead,) = s.dead_letters()
    assert column_np(dead["rows"], "sample_id").tolist() == [1, 4]
    assert all("label_ctr" in r for r in dead["rows"].column("dead_reason").to_pylist())
    s.commit(cur)  # dead letters are acknowledged with the poll that brought them
    assert s.lag() == 0 and s.poll(100)[0] is None


def test_cursor_says_when_the_consumer_is_caught_up(make_stream, sample_rows):
    s = make_stream(partitions=2)
    s.append(sample_rows(0, 100))
    t, cur = s.poll(50)
    assert t is not None and not cur.caught_up  # a poll that filled its quota cannot know there is no more
    while not cur.caught_up:
        t, cur = s.poll(1000)
    s.append(sample_rows(100, 110))
    t, cur = s.poll(1000)  # a new append after a caught-up poll: listed again and read (local), not missed
    assert sorted(column_np(t, "sample_id").tolist()) == list(range(100, 110)) and cur.caught_up
    assert s.poll(1000)[1].caught_up
