"""Signal store: writer/reader round trips, restarts, corruption, compatibility, compaction, CLI, 1-to-N."""

import threading

import numpy as np
import pytest
import torch
from helpers import META, ids_of, logits_of

from recdistill.cli import main
from recdistill.signals.cli import verify
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
    with pytest.raises(RuntimeError, match="background error"):
        w.flush()
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


def test_duplicates_resolve_to_highest_step_and_non_finite_rejected(tmp_path):
    uri = str(tmp_path / "s")
    with SignalWriter(uri, 0, META) as w:
        w.begin_window(0)
        w.write(torch.tensor([1, 2, 3]), torch.tensor([[1.0, 1.0], [2.0, 2.0], [float("nan"), 0.0]]), step=5)
        w.commit_window()
        w.begin_window(1)
        w.write(torch.tensor([1]), torch.tensor([[9.0, 9.0]]), step=7)  # same sample, a later step
        w.commit_window()
    r = SignalReader(uri)
    logits, found = r.lookup(torch.tensor([1, 2, 3, 4]))
    assert found.tolist() == [True, True, False, False]
    assert logits[0].tolist() == [9.0, 9.0]
    assert r.stats.duplicates == 1 and r.stats.non_finite_rows == 1
    assert r.stats.rejected_non_finite == 1 and r.stats.missing == 1
    assert verify(uri) == [f"{uri}: 1 duplicate sample ids across committed shards"]


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

    def poll(i):
        while not stop.is_set():
            readers[i].refresh()
            seen[i].append(len(readers[i].windows))
            _, found = readers[i].lookup(torch.cat([ids_of(s) for s in range(15)]))
            # only whole committed windows are ever visible: found rows are a multiple of a window's rows
            assert int(found.sum()) % 24 == 0

    threads = [threading.Thread(target=poll, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for win in range(5):
        w.begin_window(win)
        for s in range(win * 3, win * 3 + 3):
            w.write(ids_of(s), logits_of(ids_of(s)), s)
        w.commit_window()
        w.flush()
    w.close()
    stop.set()
    for t in threads:
        t.join()
    for r in readers:
        r.refresh()
        assert r.windows == [0, 1, 2, 3, 4]
    assert all(s == sorted(s) for s in seen)  # windows only ever appear, never vanish


def test_cuda_path_skipped_without_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: checks the pinned async copy + event path of SignalWriter.write")
    uri = "memory://cuda-store"
    with SignalWriter(uri, 0, META) as w:
        w.begin_window(0)
        ids = ids_of(0).cuda()
        w.write(ids, logits_of(ids.cpu()).cuda(), 0)
    logits, found = SignalReader(uri).lookup(ids_of(0))
    assert found.all() and torch.allclose(logits, logits_of(ids_of(0)))


def test_ids_are_int64_sorted_join_vectorised():
    r = SignalReader("memory://nothing-here")
    logits, found = r.lookup(torch.tensor([1, 2]))
    assert logits.shape == (2, 0) and not found.any() and r.stats.missing == 2
    assert np.issubdtype(r._ids.dtype, np.int64)


def test_hash_index_matches_a_dict_including_collisions():
    from recdistill.signals.index import HashIndex

    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(-(1 << 50), 1 << 50, 5000))
    keys = np.concatenate([keys, np.arange(64) * 4096])  # many share low bits
    keys = np.unique(keys)
    rng.shuffle(keys)
    index = HashIndex(keys)
    ref = {int(k): i for i, k in enumerate(keys)}
    query = np.concatenate([keys, rng.integers(-(1 << 50), 1 << 50, 3000), np.array([0, 1, -1])])
    want = np.array([ref.get(int(k), -1) for k in query])
    assert np.array_equal(index.get(query), want)
    assert np.array_equal(HashIndex(np.zeros(0, np.int64)).get(np.array([5])), [-1])
    with pytest.raises(ValueError, match="reserved"):
        HashIndex(np.array([np.iinfo(np.int64).min]))
