"""The streaming student on a real joined stream (local backend, real joiner, oracle teacher signals on the real
signal stream): every row of its view trained once, label-only rows while the teacher stalls, NaN signals rejected,
re-deliveries dropped, the cursor committed only with a checkpoint, and a SIGKILLed student that resumes ends
bit-identical to one that was never killed. Malformed joined records are dead-lettered and training goes on (both
backends); redis-server SIGKILLed mid-stream (AOF tail cut, restart) under a student alone and under producers,
joiner and student together: every view row trained once, none lost."""

import os
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers import ROOT, publish_oracle_joined

from recdistill.config import load_config
from recdistill.data.sampling import keep_mask
from recdistill.data.source import build_source
from recdistill.streams import open_stream
from recdistill.streams.base import column_np
from recdistill.streams.redis import RedisStream, encode
from recdistill.streams.server import RedisServer
from recdistill.train import student_checkpoint as ckpt
from recdistill.train.stream_student import StreamingStudent
from recdistill.train.student import StudentTrainer

SMALL = ["data.num_days=3", "data.samples_per_day=3000", "data.history_len=16", "data.batch_size=64",
         "data.prefetch=0", "data.world.num_users=200", "data.world.num_items=300", "student.history_len=8",
         "student.export=false", "tracking.progress=false", "student.lr=0.01", "student.batch_size=32",
         "student.checkpoint_every=4", "stream.max_delay_s=600"]
STALL, NAN = (1, 1000, 1600), (1, 2000, 2300)  # (day, first index, end index) of teacher faults


def overrides(tmp, *extra):
    return [*SMALL, f"stream.path={tmp / 'stream'}", f"student.checkpoint_dir={tmp / 'ck'}", *extra]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Day 1 on the joined stream, the teacher stalled for one span and writing NaN for another."""
    tmp = tmp_path_factory.mktemp("pub")
    cfg = load_config(None, overrides(tmp))
    info = publish_oracle_joined(cfg, [1], stall=STALL, nan=NAN)
    return tmp, cfg, info


def student_view(cfg, ids):
    src = build_source(cfg.data)
    b = src.read_ids(ids)
    view = cfg.sampling.student
    keep = keep_mask(ids, b.labels[view.task].numpy() > 0.5, b.traffic.numpy(), view, src.schema.num_traffic)
    return ids[keep]


def in_span(ids, span):
    idx = ids & ((1 << 40) - 1)
    return (idx >= span[1]) & (idx < span[2])


@pytest.fixture(scope="module")
def published_redis(tmp_path_factory):
    """The same day on a real redis-server (entries of 100 rows, so polls span several)."""
    tmp = tmp_path_factory.mktemp("pubr")
    with RedisServer() as server:
        extra = ["stream.backend=redis", f"stream.redis_url={server.url}", "stream.entry_rows=100"]
        cfg = load_config(None, overrides(tmp, *extra))
        info = publish_oracle_joined(cfg, [1], stall=STALL, nan=NAN)
        yield tmp, cfg, info, extra


def streaming(cfg, ck_dir, stream_path, materialise=None, group=None):
    c = cfg.model_copy(deep=True)
    c.student.checkpoint_dir, c.stream.path = str(ck_dir), str(stream_path)
    if group is not None:  # redis: a group of its own gets every row
        c.stream.group = group
    return StreamingStudent(StudentTrainer(c, run_dir=ck_dir, open_store=False), open_stream(c.stream, "joined"),
                            materialise_uri=materialise)


def test_every_view_row_trained_once_labels_only_while_the_teacher_stalls(published, tmp_path):
    tmp, cfg, info = published
    assert info["join/expired"] == int(in_span(info["ids"], STALL).sum()) > 0  # the stalled span went out label-only
    s = streaming(cfg, tmp_path / "ck", tmp / "stream", materialise=str(tmp_path / "mat"))
    s.run()
    assert s.stream.lag() > 0  # rows after the last checkpoint are not committed yet
    summary = s.finish()
    mine = student_view(cfg, info["ids"])
    assert summary["stream/trained"] == len(mine) == summary["train/samples"] > 300
    assert summary["stream/outside_view"] == len(info["ids"]) - len(mine)
    assert summary["stream/label_only"] == int(in_span(mine, STALL).sum()) > 0
    assert summary["stream/with_signal"] == len(mine) - summary["stream/label_only"]
    assert summary["signals/rejected_non_finite"] == int(in_span(mine, NAN).sum()) > 0
    assert summary["signals/missing"] == summary["stream/label_only"]
    assert summary["signals/joined"] > 0.5 * len(mine)  # signals picked up again after the stall
    assert s.stream.lag() == 0 and ckpt.step_of(ckpt.newest(tmp_path / "ck")) == summary["train/steps"]
    assert all(torch.isfinite(p).all() for p in s.t.model.parameters())
    s.close()

    # materialised: a batch student on that store (day 1 only, the streamed day) sees the same supervision
    mat = ["student.train_days=1", f"student.signals_uri={tmp_path / 'mat'}"]
    batch = StudentTrainer(load_config(None, [*SMALL, *mat]), run_dir=tmp_path)
    assert batch.train_days == [1]
    got = batch.train()
    assert got["train/samples"] == summary["train/samples"]
    for k in ("looked_up", "missing", "rejected_non_finite", "joined", "rejected_batches"):
        assert got[f"signals/{k}"] == summary[f"signals/{k}"], k
    # the store holds exactly the signals that came with the rows: same ids, same raw logits
    logits, found = batch.reader.lookup(torch.from_numpy(mine))
    assert int(found.sum()) + summary["signals/rejected_non_finite"] == summary["stream/with_signal"]

    # an at-least-once re-delivery of rows already trained is dropped, not trained again
    joined = open_stream(cfg.stream.model_copy(update={"path": str(tmp / "stream")}), "joined")
    first, _ = joined.poll(200)
    open_stream(cfg.stream.model_copy(update={"path": str(tmp / "stream")}), "joined").append(first)
    again = streaming(cfg, tmp_path / "ck", tmp / "stream")
    after = again.run()
    assert after["stream/redelivered"] == 200 and after["stream/trained"] == summary["stream/trained"]


def kill_and_resume(cfg, tmp, tmp_path, extra=()):
    """A reference student runs through; another is SIGKILLed mid-stream in a subprocess and resumed here.
    Returns (reference summary, resumed summary, reference trainer, resumed trainer) for the caller to compare."""
    ref = streaming(cfg, tmp_path / "ref", tmp / "stream", group="ref")
    ref.run()
    want = ref.finish()
    kill_at = 11  # of ~15 steps; checkpoints every 4 steps at poll boundaries: some trained steps die with the process
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "train" / "stream_student_kill_at.py"), str(kill_at),
                           *overrides(tmp), *extra, f"student.checkpoint_dir={tmp_path / 'ck'}", "stream.group=kill"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    saved = ckpt.step_of(ckpt.newest(tmp_path / "ck"))
    assert 0 < saved < kill_at  # the at-least-once window: steps (saved, kill_at) are trained again
    resumed = streaming(cfg, tmp_path / "ck", tmp / "stream", group="kill")
    assert resumed.resumed_from is not None and resumed.t.steps == saved
    resumed.run()
    return want, resumed.finish(), ref, resumed


def assert_same_run(want, got, ref, resumed):
    """Same counts, bit-identical weights, nothing left uncommitted (redis: unacknowledged)."""
    for k in ("train/steps", "stream/trained", "stream/label_only", "stream/with_signal", "signals/joined",
              "signals/rejected_non_finite"):
        assert got[k] == want[k], k
    for (name, a), b in zip(ref.t.model.state_dict().items(), resumed.t.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.stream.lag() == 0


@pytest.mark.multiproc
def test_sigkilled_streaming_student_resumes_bit_identical(published, tmp_path):
    tmp, cfg, _ = published
    want, got, ref, resumed = kill_and_resume(cfg, tmp, tmp_path)
    assert got["train/steps"] == want["train/steps"] > 0
    assert_same_run(want, got, ref, resumed)


@pytest.mark.slow
@pytest.mark.multiproc
def test_sigkilled_streaming_student_on_redis_resumes_bit_identical(published_redis, tmp_path):
    """Redis: the killed consumer's un-acknowledged entries are delivered to it again after the restart (its
    pending list), the ones its checkpoint already holds dropped by the restored dedup window."""
    tmp, cfg, _, extra = published_redis
    want, got, ref, resumed = kill_and_resume(cfg, tmp, tmp_path, extra)
    assert got["train/steps"] == want["train/steps"] > 0
    assert_same_run(want, got, ref, resumed)


def test_stream_rows_rebuild_the_worlds_samples(published):
    _, cfg, info = published
    src = build_source(cfg.data)
    ids = info["ids"][[5, 0, 900]]
    b = src.read_ids(ids)
    ref = src.read(1, 0, cfg.data.samples_per_day).select(torch.from_numpy(ids & ((1 << 40) - 1)))
    assert b.sample_id.tolist() == ids.tolist() and torch.equal(b.dense, ref.dense)
    assert torch.equal(b.history.fields["item"], ref.history.fields["item"])


def test_phase_days_leave_the_streaming_days_out_of_the_batch_phase():
    from recdistill.data.source import phase_days

    assert phase_days(list(range(8)), 1) == (list(range(7)), [7], [])  # no streaming phase: as before
    # 4 streaming days: batch trains on 0-6 and is scored on 7; streaming days 7-10, each scored on the next
    assert phase_days(list(range(12)), 1, 4) == (list(range(7)), [7], [7, 8, 9, 10])
    with pytest.raises(ValueError, match="cannot hold"):
        phase_days(list(range(5)), 1, 4)


def _inject(stream, table):
    """Write rows as a foreign producer would, past the producer-side key checks of `append`."""
    if isinstance(stream, RedisStream):
        stream.client.xadd(stream.keys[0], {"b": encode(table), "n": table.num_rows, "t": 0, "pid": "x", "seq": 0})
        stream.client.hincrby(stream.rows_key, "appended", table.num_rows)  # as append counts its rows
    else:
        if stream._next_append is None:
            stream._next_append = {p: stream.end_offset(p) for p in range(stream.partitions)}
        stream._publish(0, table)


def _malformed(good):
    """Joined rows that must be dead-lettered, built from good ones moved to ids of day 2 (in the world, never
    published): (rows the student's checks catch: a, b), (records the backend puts aside: c, d)."""
    tpl = good.slice(0, 6)
    ids = (np.int64(2) << np.int64(40)) + np.arange(6, dtype=np.int64)
    tpl = tpl.set_column(0, "sample_id", pa.array(ids))
    a = tpl.slice(0, 4).to_pydict()
    a["label_ctr"][0] = float("nan")
    a["traffic"][1] = 99
    a["has_signal"][2], a["logits"][2] = True, None
    a["sample_id"][3] = 50 << 40  # no such day in the world
    a = pa.Table.from_pydict(a, schema=tpl.schema)
    b = tpl.slice(4, 1).to_pydict()
    b["has_signal"], b["logits"] = [True], [[0.1, 0.2]]  # two logits for three tasks
    b = pa.Table.from_pydict(b, schema=tpl.schema.set(tpl.schema.get_field_index("logits"),
                                                      pa.field("logits", pa.list_(pa.float32()))))
    c = tpl.slice(5, 1).set_column(0, "sample_id", pa.array([None], pa.int64()))  # null id: the backend refuses it
    d = tpl.slice(5, 1).set_column(tpl.schema.get_field_index("label_ctr"), "label_ctr", pa.array(["1"]))
    return (a, b), (c, d)


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_malformed_joined_records_are_dead_lettered_and_training_goes_on(backend, published, published_redis,
                                                                          tmp_path, caplog):
    tmp, cfg = (published[:2] if backend == "local" else published_redis[:2])
    src_cfg = cfg.stream.model_copy(update={"path": str(tmp / "stream"), "group": f"copy-{tmp_path.name}"})
    reader = open_stream(src_cfg, "joined", consumer="copy")
    good = pa.concat_tables([t for t in iter(lambda: reader.poll(10_000)[0], None)]).slice(0, 640)
    out = open_stream(src_cfg, f"bad-{tmp_path.name}")
    (a, b), (c, d) = _malformed(good)
    for table in (good.slice(0, 300), a, good.slice(300, 150), b, c, good.slice(450, 150), d, good.slice(600)):
        if table is c:
            _inject(out, table)
        else:
            out.append(table)
    c_ = cfg.model_copy(deep=True)
    c_.student.checkpoint_dir, c_.stream = str(tmp_path / "ck"), src_cfg.model_copy(update={"group": "learner"})
    s = StreamingStudent(StudentTrainer(c_, run_dir=tmp_path, open_store=False),
                         open_stream(c_.stream, f"bad-{tmp_path.name}", consumer="learner"))
    with caplog.at_level("WARNING"):
        s.run()
        summary = s.finish()
    mine = student_view(cfg, column_np(good, "sample_id"))
    assert summary["stream/trained"] == len(mine) == summary["train/samples"] > 100  # every good row, once
    assert summary["stream/dead_lettered"] == 5 and summary["stream/dead_lettered_by_backend"] == 2
    bad_ids = column_np(a, "sample_id").tolist() + column_np(b, "sample_id").tolist()
    assert all(f"sample_id {i}:" in caplog.text for i in bad_ids)  # the log names every record
    dead = s.stream.dead_letters()
    rows = pa.concat_tables([dl["rows"].select(["sample_id", "dead_reason"]) for dl in dead
                             if dl["rows"] is not None and "dead_reason" in dl["rows"].column_names])
    why = dict(zip(column_np(rows, "sample_id").tolist(), rows.column("dead_reason").to_pylist(), strict=True))
    assert "label_ctr" in why[bad_ids[0]] and "traffic" in why[bad_ids[1]] and "logits" in why[bad_ids[2]]
    assert "outside the data source" in why[bad_ids[3]] and "not 3 values" in why[bad_ids[4]]
    assert "schema does not fit" in why[int(column_np(d, "sample_id")[0])]
    assert any("sample_id" in dl["reason"] and "null" in dl["reason"] for dl in dead)  # the null-id record
    assert s.stream.lag() == 0  # acknowledged with the checkpoint: not delivered again
    s.close()


def test_redis_server_kill9_mid_stream_student_reconnects_and_loses_nothing(tmp_path, caplog):
    """The student trains on the joined stream in redis; redis-server is SIGKILLed mid-run, its AOF loses what was
    written after the stream was published (the student's own reads and acks: the appendfsync window, made real by
    cutting the AOF's tail), and it restarts on the same port a second later. The student waits for it (bounded),
    re-reads its pending entries, drops the rows it already has, and ends bit-identical to a student that saw no
    crash: every row of its view trained exactly once, none lost."""
    server = RedisServer(dir=str(tmp_path / "redis")).start()
    aof = os.path.join(server.dir, "appendonly.aof")
    try:
        extra = ["stream.backend=redis", f"stream.redis_url={server.url}", "stream.entry_rows=100",
                 "stream.reconnect_s=30", "data.samples_per_day=1500"]
        cfg = load_config(None, overrides(tmp_path, *extra))
        info = publish_oracle_joined(cfg, [1])

        def student(name):
            c = cfg.model_copy(deep=True)
            c.student.checkpoint_dir, c.stream.group = str(tmp_path / name), name
            return StreamingStudent(StudentTrainer(c, run_dir=tmp_path / name, open_store=False),
                                    open_stream(c.stream, "joined", consumer=name), poll_rows=200)

        ref = student("ref")
        ref.run()
        want = ref.finish()
        s, trained = student("crash"), []
        train = s._train
        s._train = lambda rows: (trained.append(column_np(rows, "sample_id").copy()), train(rows))[1]
        aof_before = os.path.getsize(aof)
        s.run(max_polls=4)
        assert 0 < s.counts.polled < len(info["ids"])  # mid-stream
        server.kill()
        os.truncate(aof, os.path.getsize(aof) - (os.path.getsize(aof) - aof_before) // 2)
        threading.Timer(1.0, server.start).start()
        with caplog.at_level("WARNING"):
            s.run()
            got = s.finish()
        ids = np.concatenate(trained)
        mine = student_view(cfg, info["ids"])
        assert len(ids) == len(np.unique(ids)) and np.array_equal(np.sort(ids), np.sort(mine))  # each once, all
        assert s.stream.reconnects >= 1 and "unreachable" in caplog.text and "is back" in caplog.text
        assert got["stream/redelivered"] > 0  # the restarted server had lost the student's last reads/acks
        assert_same_run(want, got, ref, s)
        assert s.stream.pending() == 0
    finally:
        server.close()


def test_redis_kill9_under_joiner_and_student_no_joined_sample_lost(tmp_path):
    """End to end on one redis-server: producers, joiner and student run in turns over day 1; redis-server is
    SIGKILLed halfway with the AOF's last 30% cut (joined entries, input acks, student reads all lost), and restarts
    a second later. The producers re-send from their high water, a new joiner (the old process died with its
    connection) resumes from the inputs' pending entries, the same student reconnects. Every row of the student's
    view is trained exactly once, each with its teacher signal: no joined sample lost."""
    from helpers import oracle_logits

    from recdistill.data.loader import BatchLoader
    from recdistill.streams.joiner import Joiner
    from recdistill.streams.records import day_end_ms, sample_records, signal_records
    from recdistill.streams.redis import ServerRestarted

    server = RedisServer(dir=str(tmp_path / "redis")).start()
    try:
        extra = ["stream.backend=redis", f"stream.redis_url={server.url}", "stream.entry_rows=50",
                 "stream.reconnect_s=30", "data.samples_per_day=1500"]
        cfg = load_config(None, overrides(tmp_path, *extra))
        src = build_source(cfg.data)
        tasks, view = src.schema.task_names, cfg.sampling.teacher
        rec_s, rec_g, seq = [], [], 0
        for b in BatchLoader(src, [1], cfg.data.batch_size, view=view, prefetch=0):
            rec_s.append(sample_records(b, tasks, 1500, seq))
            rec_g.append(signal_records(b.sample_id.numpy(), oracle_logits(b, tasks, view, src.schema.num_traffic)
                                        .numpy(), step=0, version="oracle", rows_per_day=1500, seq0=seq))
            seq += len(b)
        samples_all, signals_all = pa.concat_tables(rec_s), pa.concat_tables(rec_g)
        prods = [open_stream(cfg.stream, "samples", producer_id="ps"), open_stream(cfg.stream, "signals",
                                                                                    producer_id="pg")]
        pos, resent = [0, 0], []

        def publish(upto):  # each producer appends its rows up to `upto`, re-sending from its high water if needed
            for k, (prod, rows) in enumerate(zip(prods, (samples_all, signals_all), strict=True)):
                while pos[k] < upto:
                    try:
                        prod.append(rows.slice(pos[k], min(64, upto - pos[k])))
                        pos[k] = min(pos[k] + 64, upto)
                    except ServerRestarted:
                        pos[k] = prod.producer_high_water() + 1  # seq == row index
                        resent.append((k, pos[k]))

        def joiner():
            return Joiner.from_config(cfg.stream, open_stream(cfg.stream, "samples", consumer="j"),
                                      open_stream(cfg.stream, "signals", consumer="j"),
                                      open_stream(cfg.stream, "joined", producer_id="joiner"), num_tasks=len(tasks))

        c = cfg.model_copy(deep=True)
        c.student.checkpoint_dir = str(tmp_path / "ck")
        s = StreamingStudent(StudentTrainer(c, run_dir=tmp_path, open_store=False),
                             open_stream(c.stream, "joined", consumer="s"), poll_rows=200)
        trained, train = [], s._train
        s._train = lambda rows: (trained.append(column_np(rows, "sample_id").copy()), train(rows))[1]
        half = samples_all.num_rows // 2
        j = joiner()
        for upto in range(200, half + 1, 200):
            publish(upto)
            j.drain()
            s.run()
        joined_before = j.out.entries()
        server.kill()
        aof = os.path.join(server.dir, "appendonly.aof")
        os.truncate(aof, int(os.path.getsize(aof) * 0.7))
        threading.Timer(1.0, server.start).start()
        s.run()  # reconnects; reads what the restarted server still has
        assert j.out.entries() < joined_before  # the crash lost joined entries the joiner had published
        j = joiner()  # the joiner process died with the server's connection: a new one from the pending entries
        for upto in [*range(half, samples_all.num_rows, 200), samples_all.num_rows]:
            publish(upto)
            j.drain()
            s.run()
        j.flush(day_end_ms(1))
        s.run()
        got = s.finish()
        ids = np.concatenate(trained)
        mine = student_view(cfg, column_np(samples_all, "sample_id"))
        assert s.stream.reconnects >= 1 and {k for k, _ in resent} == {0, 1}  # both producers had to re-send
        assert all(p < half for _, p in resent)  # from before the crash point: the server had lost their appends
        assert len(ids) == len(np.unique(ids)) and np.array_equal(np.sort(ids), np.sort(mine))  # once each, all
        assert got["stream/with_signal"] == got["stream/trained"] == len(mine)  # every one joined with its signal
        assert got["stream/redelivered"] > 0 and s.stream.lag() == 0
    finally:
        server.close()
