"""Local backend specifics: a reader never sees a half-written segment (a writer appending while a reader polls,
and a writer that died mid-segment), offsets survive in the consumer's checkpoint, a checkpoint of another stream is
refused, and it works on a non-local fsspec file system (memory://)."""

import json
import threading

import numpy as np
import pyarrow as pa
import pytest

from recdistill.streams.base import StreamError, column_np
from recdistill.streams.local import LocalStream


def test_reader_sees_whole_appends_only(tmp_path, sample_rows):
    writer = LocalStream(str(tmp_path), "live")
    reader = LocalStream(str(tmp_path), "live", poll_interval=0.001)
    done = threading.Event()

    def produce():
        for lo in range(0, 30_000, 1000):
            writer.append(sample_rows(lo, lo + 1000))
        done.set()

    th = threading.Thread(target=produce)
    th.start()
    seen = []
    while not (done.is_set() and reader.lag() == 0):
        t, cur = reader.poll(100_000, timeout=0.01)
        if t is not None:
            # every poll ends on an append boundary: a segment is visible only once complete
            assert (column_np(t, "sample_id")[-1] + 1) % 1000 == 0
            seen.append(column_np(t, "sample_id"))
            reader.commit(cur)
    th.join()
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(30_000))


def test_writer_dead_mid_segment_is_invisible(tmp_path, sample_rows):
    s = LocalStream(str(tmp_path), "crashy")
    s.append(sample_rows(0, 100))
    # A writer killed while writing leaves a partial file under _tmp/: readers never list it.
    (tmp_path / "crashy" / "_tmp" / "dead.arrow").write_bytes(b"ARROW1\x00\x00partial")
    reader = LocalStream(str(tmp_path), "crashy")
    t, _ = reader.poll(1000)
    assert t.num_rows == 100
    s2 = LocalStream(str(tmp_path), "crashy")  # a restarted producer continues after the published offsets
    s2.append(sample_rows(100, 150))
    assert column_np(reader.poll(1000)[0], "sample_id").tolist() == list(range(100, 150))


def test_offsets_travel_in_the_checkpoint(sample_rows):
    s = LocalStream("memory://ckpt-test", "st", partitions=2)
    s.append(sample_rows(0, 100))
    t, cur = s.poll(30)
    s.commit(cur)
    state = json.loads(json.dumps(s.state_dict()))  # what a checkpoint's JSON holds
    assert sum(state["committed"].values()) == 30
    other = LocalStream("memory://ckpt-test", "st", partitions=2)
    other.load_state_dict(state)
    rest, _ = other.poll(1000)
    assert set(column_np(rest, "sample_id").tolist()) == set(range(100)) - set(column_np(t, "sample_id").tolist())
    with pytest.raises(StreamError, match="checkpoint state is for 'st'"):
        LocalStream("memory://ckpt-test", "other", partitions=2).load_state_dict(state)


def test_unreadable_segment_is_dead_lettered_by_name_and_consumption_goes_on(tmp_path, sample_rows, caplog):
    s = LocalStream(str(tmp_path), "rot")
    s.append(sample_rows(0, 10))
    seg = next((tmp_path / "rot" / "p=0").glob("*.arrow"))
    s.append(sample_rows(10, 20))
    good = seg.read_bytes()
    seg.write_bytes(good[:40])  # bit rot / truncation after publish
    reader = LocalStream(str(tmp_path), "rot")
    with caplog.at_level("WARNING"):
        t, cur = reader.poll(100)
    assert column_np(t, "sample_id").tolist() == list(range(10, 20))  # the rows after it still come
    assert cur.positions == {0: 20}  # the bad segment's rows count as consumed: committed with the poll
    assert seg.name in caplog.text
    (dead,) = reader.dead_letters()
    assert dead["where"].endswith(seg.name) and "unreadable" in dead["reason"] and dead["rows"] is None
    assert (tmp_path / "rot" / "_dead" / dead["payload"]).read_bytes() == good[:40]  # kept for inspection
    reader.commit(cur)
    assert reader.lag() == 0 and reader.poll(100)[0] is None


def test_schema_is_kept(tmp_path, sample_rows):
    s = LocalStream(str(tmp_path), "schema")
    rows = sample_rows(0, 10)
    s.append(rows)
    t, _ = s.poll(100)
    assert t.schema.equals(rows.schema) and t.equals(rows)
    assert isinstance(t, pa.Table)
