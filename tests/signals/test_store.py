"""Signal store: writer/reader round trips, restarts, corruption, compatibility, compaction, CLI, 1-to-N."""

import threading
import time

import numpy as np
import pytest
import torch
from helpers import META, ids_of, logits_of

from recdistill.cli import main
from recdistill.signals.check import verify
from recdistill.signals.compact import compact
from recdistill.signals.reader import SignalReader
from recdistill.signals.schema import SignalError, shard_path
from recdistill.signals.writer import SignalWriter


def write_windows(uri, windows, rank=0, steps_per_window=3, meta=META):
    with SignalWriter(uri, rank, meta) as w:
        for win in windows:
            w.begin_window(win)
            for s in range(win * steps_per_window, (win + 1) * steps_per_window):
                ids = ids_of(s, rank)
                w.write(ids, logits_of(ids), step=s)
            w.commit_window()
    return w


@pytest.mark.parametrize("kind", ["memory", "local"])
def test_round_trip_two_ranks(kind, tmp_path):
    uri = f"memory://store-{kind}" if kind == "memory" else str(tmp_path / "store")
    write_windows(uri, [0, 1], rank=0)
    write_windows(uri, [0, 1], rank=1)
    r = SignalReader(uri, tasks=["ctr", "cvr"], teacher_version="abc123")
    assert r.windows == [0, 1] and r.stats.rows == 2 * 2 * 3 * 8
    want = torch.cat([ids_of(s, rank) for s in range(6) for rank in (0, 1)])
    query = torch.cat([want, torch.tensor([-5, 999_999])])
    logits, found = r.lookup(query)
    assert found.tolist() == [True] * len(want) + [False, False]
    torch.testing.assert_close(logits[: len(want)], logits_of(want))
    assert (logits[-2:] == 0).all() and r.stats.missing == 2


def test_restart_never_rewrites_committed_windows_and_cleans_orphans(tmp_path):
    uri = str(tmp_path / "s")
    write_windows(uri, [0, 1])
    before = (tmp_path / "s" / "window=0" / "rank=0.arrow").read_bytes()
    orphan = tmp_path / "s" / "window=2" / "rank=0.arrow"
    orphan.parent.mkdir()
    orphan.write_bytes(b"half a shard")
    other_rank = tmp_path / "s" / "window=2" / "rank=1.arrow"
    other_rank.write_bytes(b"not mine")
    w = SignalWriter(uri, 0, META)
    assert w.stats.orphans_removed == 1 and not orphan.exists() and other_rank.exists()
    assert w.is_committed(1) and not w.is_committed(2)
    w.begin_window(1)  # a replay of a committed window: dropped
    w.write(ids_of(3), logits_of(ids_of(3)) + 1, step=3)
    w.commit_window()
    w.begin_window(2)
    w.write(ids_of(6), logits_of(ids_of(6)), step=6)
    w.close()
    assert w.stats.rows_dropped_committed == 8 and w.stats.windows_committed == 1
    assert (tmp_path / "s" / "window=0" / "rank=0.arrow").read_bytes() == before
    r = SignalReader(uri)
    logits, found = r.lookup(ids_of(3))
    assert found.all() and torch.allclose(logits, logits_of(ids_of(3)))  # the original rows, not the replay
    assert r.windows == [0, 1, 2] and r.stats.duplicates == 0


def test_uncommitted_data_is_invisible(tmp_path):
    uri = str(tmp_path / "s")
    w = SignalWriter(uri, 0, META)
    w.begin_window(0)
    w.write(ids_of(0), logits_of(ids_of(0)), step=0)
    w.flush()
    assert SignalReader(uri).lookup(ids_of(0))[1].sum() == 0
    w.commit_window()
    w.flush()
    assert SignalReader(uri).lookup(ids_of(0))[1].all()
    w.close()


def test_background_error_surfaces_on_the_training_thread(tmp_path):
    uri = tmp_path / "s"
    uri.mkdir()
    (uri / "window=0").write_text("a file where the window directory must go")
    w = SignalWriter(str(uri), 0, META)
    w.begin_window(0)
    w.write(ids_of(0), logits_of(ids_of(0)), step=0)
    w.commit_window()
    w.begin_window(1)
    for _ in range(200):  # the error surfaces at the first call after the serializer failed: a write here
        try:
            w.write(ids_of(1), logits_of(ids_of(1)), step=3)
        except RuntimeError as exc:
            assert "background error" in str(exc) and "window=0" in str(exc.__cause__)
            break
        time.sleep(0.01)
    else:
        pytest.fail("the serializer's error never reached the training thread")
    w.flush()  # raised once, then the writer goes on (the window stays uncommitted: a restart rewrites it)
    w.close(commit=False)
    with pytest.raises(ValueError, match=r"logits must be \[B, 2\]"):
        _write_bad(tmp_path)


def _write_bad(tmp_path):
    w = SignalWriter(str(tmp_path / "t"), 0, META)
    w.begin_window(0)
    try:
        w.write(ids_of(0), torch.zeros(8, 3), 0)
    finally:
        w.close(commit=False)


def test_duplicates_resolve_to_lowest_step_and_non_finite_rejected(tmp_path):
    uri = str(tmp_path / "s")
    with SignalWriter(uri, 0, META) as w:
        w.begin_window(0)
        w.write(torch.tensor([1, 2, 3]), torch.tensor([[1.0, 1.0], [2.0, 2.0], [float("nan"), 0.0]]), step=5)
        w.commit_window()
        w.begin_window(1)
        w.write(torch.tensor([1]), torch.tensor([[9.0, 9.0]]), step=7)  # same sample, a later step: loses
        w.commit_window()
    r = SignalReader(uri)
    logits, found = r.lookup(torch.tensor([1, 2, 3, 4]))
    assert found.tolist() == [True, True, False, False]
    assert logits[0].tolist() == [1.0, 1.0]  # the out-of-sample logit of the step that first trained on it
    assert r.stats.duplicates == 1 and r.stats.non_finite_rows == 1
    assert r.stats.rejected_non_finite == 1 and r.stats.missing == 1
    assert verify(uri) == [f"{uri}: 1 duplicate sample ids across committed shards",
                           f"{uri}: 1 rows with non-finite logits (readers reject them)"]


def corrupt(path, how):
    data = path.read_bytes()
    flipped = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else flipped)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupt_shard_named_by_verify_reader_raises_or_skips(tmp_path, how, capsys):
    uri = str(tmp_path / "s")
    write_windows(uri, [0, 1, 2])
    bad = tmp_path / "s" / "window=1" / "rank=0.arrow"
    corrupt(bad, how)
    problems = verify(uri)
    assert len(problems) == 1 and str(bad) in problems[0] and "checksum mismatch" in problems[0]
    assert main(["signals", "verify", uri]) == 1
    assert str(bad) in capsys.readouterr().out
    with pytest.raises(SignalError, match=f"{bad}: checksum mismatch"):
        SignalReader(uri)
    r = SignalReader(uri, on_corrupt="skip")
    assert r.stats.corrupt_shards == 1 and r.windows == [0, 2]
    assert r.stats.corrupt_rows == sum(len(ids_of(s)) for s in range(3, 6))  # window 1's rows, as committed
    assert not r.lookup(ids_of(3))[1].any() and r.lookup(ids_of(0))[1].all()


def test_incompatible_shards_refused_with_shard_and_mismatch(tmp_path):
    uri = str(tmp_path / "s")
    write_windows(uri, [0])
    shard = shard_path(uri, 0, 0)
    with pytest.raises(SignalError, match=f"{shard}: tasks \\['ctr', 'cvr'\\] differ from the expected \\['ctr'\\]"):
        SignalReader(uri, tasks=["ctr"])
    with pytest.raises(SignalError, match=f"{shard}: teacher version 'abc123' differs from the expected 'zzz'"):
        SignalReader(uri, teacher_version="zzz")
    other = META.model_copy(update={"teacher_version": "other"})
    write_windows(uri, [1], meta=other)
    with pytest.raises(SignalError, match="window=1/rank=0.arrow: teacher version 'other' differs"):
        SignalReader(uri)
    uri2 = str(tmp_path / "v2")
    write_windows(uri2, [0], meta=META.model_copy(update={"schema_version": 2}))
    with pytest.raises(SignalError, match="schema version 2, this reader understands 1"):
        SignalReader(uri2)
    assert any("schema version 2" in p for p in verify(uri2))


def test_compaction_round_trip_and_cli(tmp_path, capsys):
    src, dst = str(tmp_path / "live"), "memory://compacted"
    write_windows(src, [0, 1, 3], rank=0)
    write_windows(src, [0, 1, 3], rank=1)
    assert main(["signals", "inspect", src]) == 0
    out = capsys.readouterr().out
    assert "windows 0..3" in out and "missing windows: [2]" in out and "teacher version abc123" in out
    assert "window 1: ranks [0, 1], 48 rows, steps 3..5" in out and '"name":"teacher"' in out
    assert main(["signals", "verify", src]) == 0
    assert main(["signals", "compact", src, dst]) == 0
    live, comp = SignalReader(src), SignalReader(dst)
    q = torch.cat([ids_of(s, r) for s in range(12) for r in (0, 1)])
    a, b = live.lookup(q), comp.lookup(q)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and int(a[1].sum()) == 9 * 2 * 8
    assert comp.windows == [0, 1, 3] and SignalReader(dst, windows=[1]).windows == [1]
    with pytest.raises(SignalError, match="no committed shards"):
        compact(str(tmp_path / "empty"), "memory://x")


def test_readers_see_only_committed_windows_while_teacher_writes(tmp_path):
    uri = str(tmp_path / "s")
    readers = [SignalReader(uri), SignalReader(uri)]
    w = SignalWriter(uri, 0, META)
    seen: list[list[int]] = [[], []]
    stop = threading.Event()

    errors: list[BaseException] = []

    def poll(i):
        try:
            while not stop.is_set():
                readers[i].refresh()
                seen[i].append(len(readers[i].windows))
                _, found = readers[i].lookup(torch.cat([ids_of(s) for s in range(15)]))
                # only whole committed windows are ever visible: found rows are a multiple of a window's rows
                assert int(found.sum()) == 24 * len(readers[i].windows)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=poll, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for win in range(5):
        w.begin_window(win)
        for s in range(win * 3, win * 3 + 3):
            w.write(ids_of(s), logits_of(ids_of(s)), s)
        w.commit_window()
        w.flush()
        time.sleep(0.05)  # the teacher trains a while: readers poll in between
    w.close()
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    for r in readers:
        r.refresh()
        assert r.windows == [0, 1, 2, 3, 4] and r.stats.rows == 5 * 24 and r.stats.duplicates == 0
    assert all(s == sorted(s) for s in seen)  # windows only ever appear, never vanish
    assert all(any(0 < n < 5 for n in s) for s in seen), "a reader never saw the store mid-run"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the pinned async copy + event path of write")
def test_cuda_write_copies_without_sync_and_round_trips():
    uri = "memory://cuda-store"
    with SignalWriter(uri, 0, META, handoff_rows=16) as w:
        w.begin_window(0)
        for s in range(4):  # int32 ids on the device (bf16 logits below): converted in the copies
            ids = ids_of(s).cuda().int()
            logits = logits_of(ids_of(s)).cuda()
            w.write(ids, logits, s)
            logits.fill_(float("nan"))  # the trainer reuses its buffers at once: the writer must have copied
        w.begin_window(1)  # commits window 0
        w.write(ids_of(9).cuda(), logits_of(ids_of(9)).cuda().bfloat16(), 9)
    r = SignalReader(uri)
    q = torch.cat([ids_of(s) for s in (0, 1, 2, 3, 9)])
    logits, found = r.lookup(q.cuda())
    assert found.all() and found.is_cuda and r.windows == [0, 1]
    torch.testing.assert_close(logits[:32].cpu(), logits_of(q[:32]))
    torch.testing.assert_close(logits[32:].cpu(), logits_of(q[32:]), atol=1e-2, rtol=1e-2)  # bf16 rounding


def test_begin_window_commits_the_open_one():
    uri = "memory://begin-commits"
    with SignalWriter(uri, 0, META) as w:
        w.begin_window(0)
        w.write(ids_of(0), logits_of(ids_of(0)), step=0)
        w.begin_window(1)  # no explicit commit_window
        w.flush()
        assert w.is_committed(0) and SignalReader(uri).windows == [0]
        w.write(ids_of(1), logits_of(ids_of(1)), step=1)
    assert SignalReader(uri).windows == [0, 1]


def test_empty_store_finds_nothing():
    r = SignalReader("memory://nothing-here", tasks=["ctr", "cvr"])
    logits, found = r.lookup(torch.tensor([1, 2]))
    assert logits.shape == (2, 2) and not found.any() and r.stats.missing == 2 and r.windows == []


@pytest.mark.parametrize("how", ["low_first", "high_first", "one_add"])
def test_signal_index_keeps_the_lowest_step_of_a_duplicated_id(how):
    """DESIGN §4: the stored logit is the first training step's (out-of-sample); a later row of the same id loses,
    whether it is added before, after or together with the earlier one."""
    from recdistill.signals.index import SignalIndex

    ids, steps = np.array([7, 8, 7, 9, 7]), np.array([12, 3, 4, 5, 30])
    logits = steps[:, None].astype(np.float32) / 10  # each row's logit names its step
    index = SignalIndex(1)
    if how == "one_add":
        dropped = index.add(ids, logits, steps)
    else:
        parts = [np.array([1, 2]), np.array([0, 3, 4])]  # id 7 at step 4 / at steps 12 and 30
        dropped = sum(index.add(ids[p], logits[p], steps[p]) for p in (parts if how == "low_first" else parts[::-1]))
    assert dropped == index.duplicates == 2 and len(index) == 3
    row = index.get(np.array([7, 8, 9]))
    assert index.steps[row].tolist() == [4, 3, 5]
    assert index.logits[row, 0].tolist() == pytest.approx([0.4, 0.3, 0.5])


def test_signal_index_matches_a_dict_across_incremental_adds_and_duplicates():
    from recdistill.signals.index import SignalIndex

    rng = np.random.default_rng(0)
    ref: dict[int, tuple[int, float]] = {}  # id -> (step, logit) of the lowest-step row
    index, superseded = SignalIndex(1), 0
    for add in range(6):  # refreshes: each adds ids, some already held (older or newer rows), some repeated
        ids = np.concatenate([rng.integers(-(1 << 40), 1 << 40, 3000), np.arange(64) << 20,  # shared low bits
                              rng.choice(np.arange(-50, 50), 40)])
        steps = rng.permutation(len(ids)) + add * 1000  # unique steps: "lowest" is never a tie
        if add == 3:
            steps -= 5000  # older than everything held: these rows win every duplicate
        logits = rng.standard_normal((len(ids), 1)).astype(np.float32)
        for i, st, v in zip(ids.tolist(), steps.tolist(), logits[:, 0].tolist(), strict=True):
            superseded += i in ref
            if i not in ref or st < ref[i][0]:
                ref[i] = (st, v)
        index.add(ids, logits, steps)
    assert len(index) == len(ref) and index.duplicates == superseded
    query = np.concatenate([np.array(list(ref)), rng.integers(-(1 << 40), 1 << 40, 2000), np.array([51, -51])])
    row = index.get(query)
    for q, r in zip(query.tolist(), row.tolist(), strict=True):
        if q not in ref:
            assert r == -1, q
        else:
            assert (index.ids[r], index.steps[r], index.logits[r, 0]) == (q, *ref[q]), q
    assert np.array_equal(SignalIndex(2).get(np.array([5, -1])), [-1, -1])


def test_window_steps_commits_windows_as_steps_advance():
    uri = "memory://window-steps"
    with SignalWriter(uri, 0, META, window_steps=3) as w:
        for s in range(7):
            w.write(ids_of(s), logits_of(ids_of(s)), step=s)
            if s == 3:
                w.flush()
                assert w.is_committed(0) and not w.is_committed(1)
                assert SignalReader(uri).windows == [0]
    r = SignalReader(uri)
    assert r.windows == [0, 1, 2] and r.stats.rows == 7 * 8  # window 2 (step 6 only) committed by close
    w2 = SignalWriter(uri, 0, META, window_steps=3)  # a restarted teacher replaying steps 0..8: all three
    for s in range(9):  # windows are committed (2 by the clean close), so nothing is written, not even 7, 8
        w2.write(ids_of(s), logits_of(ids_of(s)) + 1, step=s)
    w2.close()
    assert w2.stats.rows_dropped_committed == 9 * 8 and w2.stats.windows_committed == 0
    assert SignalReader(uri).stats.rows == 7 * 8
    with pytest.raises(ValueError, match="window_steps must be >= 1"):
        SignalWriter(uri, 0, META, window_steps=0)


def test_full_queue_blocks_write_until_the_serializer_catches_up():
    w = SignalWriter("memory://backpressure", 0, META, queue_size=2, handoff_rows=1)
    release = threading.Event()
    marker = w._write_marker

    def slow_store(commit):  # the serializer is stuck in window 0's commit
        release.wait(30)
        marker(commit)

    w._write_marker = slow_store
    w.begin_window(0)
    w.write(ids_of(0), logits_of(ids_of(0)), step=0)
    w.commit_window()
    w.begin_window(1)
    done = threading.Event()

    def train():
        for s in range(1, 6):
            w.write(ids_of(s), logits_of(ids_of(s)), step=s)  # one hand-off per write (handoff_rows=1)
        done.set()

    t = threading.Thread(target=train)
    t.start()
    assert not done.wait(0.5), "write() did not block on a full queue"
    release.set()
    t.join(10)
    assert done.is_set() and w.stats.blocked_s >= 0.4
    w.close()
    r = SignalReader("memory://backpressure")
    assert r.windows == [0, 1] and r.stats.rows == 6 * 8


def test_refresh_merges_new_windows_and_resolves_duplicates_across_refreshes():
    uri = "memory://refresh-dups"
    w = SignalWriter(uri, 0, META)
    w.begin_window(0)
    w.write(torch.tensor([1, 2]), torch.tensor([[1.0, 1.0], [2.0, 2.0]]), step=4)
    w.commit_window()
    w.flush()
    r = SignalReader(uri)
    w.begin_window(1)
    w.write(torch.tensor([1, 3]), torch.tensor([[5.0, 5.0], [3.0, 3.0]]), step=9)  # id 1 again, later: loses
    w.commit_window()
    w.begin_window(2)
    w.write(torch.tensor([2]), torch.tensor([[0.0, 0.0]]), step=1)  # id 2 again, earlier: wins
    w.close()
    assert r.refresh() == 2 and r.refresh() == 0
    logits, found = r.lookup(torch.tensor([1, 2, 3]))
    assert found.all() and logits[:, 0].tolist() == [1.0, 0.0, 3.0]
    assert r.stats.duplicates == 2 and r.stats.rows == 5 and r.windows == [0, 1, 2]


def test_compacted_store_inspect_verify_and_incremental_compaction(tmp_path, capsys):
    src, dst = str(tmp_path / "live"), tmp_path / "long-term"
    write_windows(src, [0, 1])
    assert main(["signals", "compact", src, str(dst)]) == 0
    first = sorted(p.name for p in dst.rglob("*.parquet"))
    write_windows(src, [2])
    write_windows(src, [2], rank=1)
    assert main(["signals", "compact", src, str(dst)]) == 0  # adds window 2, keeps 0 and 1 as they are
    assert set(first) < {p.name for p in dst.rglob("*.parquet")} and len(list(dst.rglob("*.parquet"))) == 3
    capsys.readouterr()
    assert main(["signals", "inspect", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "compacted store, 3 partitions, windows 0..2, ranks [0, 1], 96 rows" in out
    assert "window 2: ranks [0, 1], 48 rows" in out
    assert verify(str(dst)) == []
    r = SignalReader(str(dst), tasks=["ctr", "cvr"])
    assert r.windows == [0, 1, 2] and r.lookup(ids_of(7, rank=1))[1].all()
    part = next(p for p in dst.rglob("*.parquet") if "window=1" in str(p))
    corrupt(part, "flip")
    problems = verify(str(dst))
    assert len(problems) == 1 and str(part) in problems[0] and "checksum mismatch" in problems[0]
    assert main(["signals", "verify", str(dst)]) == 1
    with pytest.raises(SignalError, match=f"{part}: checksum mismatch"):
        SignalReader(str(dst))
    r = SignalReader(str(dst), on_corrupt="skip")
    assert r.stats.corrupt_shards == 1 and r.windows == [0, 2]


def test_leaving_the_context_on_an_exception_seals_nothing(tmp_path):
    uri = str(tmp_path / "s")
    with pytest.raises(ZeroDivisionError), SignalWriter(uri, 0, META) as w:
        w.begin_window(0)
        w.write(ids_of(0), logits_of(ids_of(0)), step=0)
        _ = 1 / 0  # the training step fails mid-window
    w.close()  # idempotent
    assert SignalReader(uri).windows == [] and not w.is_committed(0)
    w2 = SignalWriter(uri, 0, META)  # a restart finds nothing committed and cleans nothing of window 0 up
    assert not w2.is_committed(0) and w2.stats.orphans_removed == 0
    w2.close(commit=False)


def test_shard_whose_columns_do_not_match_its_metadata_is_refused(tmp_path):
    """A foreign writer's shard: valid Arrow, valid commit, but logits of 3 values for 2 declared tasks."""
    import pyarrow as pa

    from recdistill.signals.schema import META_KEY, Commit, checksum, commit_path

    uri = str(tmp_path / "s")
    write_windows(uri, [0])
    table = pa.table({"sample_id": pa.array([7, 8], pa.int64()),
                      "logits": pa.FixedSizeListArray.from_arrays(pa.array([0.0] * 6, pa.float32()), 3),
                      "teacher_step": pa.array([1, 1], pa.int64())})
    table = table.replace_schema_metadata({META_KEY: META.model_dump_json().encode()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    data = sink.getvalue().to_pybytes()
    (tmp_path / "s" / "window=1").mkdir()
    (tmp_path / "s" / "window=1" / "rank=0.arrow").write_bytes(data)
    commit = Commit(window=1, rank=0, rows=2, checksum=checksum(data), nbytes=len(data), step_min=1, step_max=1,
                    meta=META)
    (tmp_path / commit_path("s", 1, 0)).write_text(commit.to_json())
    shard = shard_path(uri, 1, 0)
    with pytest.raises(SignalError, match=f"{shard}: columns .*logits: fixed_size_list<item: float>\\[3\\].* differ "
                                          "from the schema v1 record for 2 tasks"):
        SignalReader(uri)
    assert any(shard in p and "columns" in p for p in verify(uri))


def test_on_commit_hook_sees_each_committed_window_once():
    seen = []
    uri = "memory://hook"
    with SignalWriter(uri, 0, META, window_steps=2, on_commit=lambda c, t: seen.append(
            (c.window, c.rows, t.column("sample_id").to_pylist()))) as w:
        for s in range(5):
            w.write(ids_of(s), logits_of(ids_of(s)), step=s)
    assert [(win, rows) for win, rows, _ in seen] == [(0, 16), (1, 16), (2, 8)]
    assert seen[1][2] == torch.cat([ids_of(2), ids_of(3)]).tolist()

    def broken(commit, table):
        raise OSError("stream backend down")

    w = SignalWriter("memory://hook2", 0, META, on_commit=broken)
    w.begin_window(0)
    w.write(ids_of(0), logits_of(ids_of(0)), step=0)
    w.commit_window()
    with pytest.raises(RuntimeError, match="stream backend down"):
        w.flush()
    w.close()
