"""The bounded-memory reader joins exactly as the in-memory one, on a store many times larger than its budget."""

import numpy as np
import pytest
import torch
from helpers import META, write_oracle_signals

from recdistill.config import load_config
from recdistill.signals.bounded import (
    BoundedSignalReader,
    open_reader,
    resident_bytes_per_row,
    segment_bytes_per_row,
)
from recdistill.signals.compact import compact
from recdistill.signals.reader import SignalReader
from recdistill.signals.schema import SignalError
from recdistill.signals.writer import SignalWriter
from recdistill.train.student import StudentTrainer

ROWS = 64  # per step and rank
# 400 rows per segment: the store below (~200 rows per shard, 20 shards) is ~10 segments
BUDGET_MB = 400 * segment_bytes_per_row(2) / 2**20


def logits_at(ids: torch.Tensor, step: int) -> torch.Tensor:
    """Logits that differ by step, so the test sees which duplicate won."""
    x = ids.double() + 0.001 * step
    return torch.stack([torch.sin(x), torch.cos(x)], 1).float()


def write_store(uri: str, windows: range, *, rank: int) -> None:
    """A teacher in day order: window w trains ids of 'day' w (two ranks split each day). Rank 1 replays some
    ids of earlier windows at later steps (they lose), and in window 5 writes ids of window 9 at a step lower
    than window 9's (they win: a later segment's row supersedes rows that come after it in the store)."""
    with SignalWriter(uri, rank, META) as w:
        for win in windows:
            w.begin_window(win)
            for s in range(win * 3, win * 3 + 3):
                ids = torch.arange(ROWS) + s * 1000 + rank * 100
                z = logits_at(ids, s)
                if s % 7 == 0:
                    z[:3, 1] = float("nan")  # rejected rows
                w.write(ids, z, step=s)
            if rank == 1 and win >= 2:
                old = torch.arange(10) + (win - 2) * 3000
                w.write(old, logits_at(old, 10_000 + win), step=10_000 + win)  # replays: later steps lose
            if rank == 1 and win == 5:
                ahead = torch.arange(20) + 27_000 + 100  # window 9's ids of rank 1, at a lower step
                w.write(ahead, logits_at(ahead, 1), step=1)
            w.commit_window()


def query_stream(seed: int = 0) -> list[torch.Tensor]:
    """The student's order: day by day, a subset of each day's ids shuffled within the day, plus absent ids."""
    rng = np.random.default_rng(seed)
    out = []
    for day in range(12):
        ids = np.concatenate([np.arange(ROWS) + s * 1000 + r * 100 for s in range(day * 3, day * 3 + 3)
                              for r in (0, 1)] + [np.array([-1, day * 3000 + 999, 10**12])])
        ids = rng.permutation(ids[rng.random(len(ids)) < 0.8])
        out += list(torch.from_numpy(ids).split(50))
    return out


def joined(reader: SignalReader, stream: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [reader.lookup(q) for q in stream]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def assert_same_join(got: SignalReader, want: SignalReader, stream: list[torch.Tensor]) -> None:
    (gl, gf), (wl, wf) = joined(got, stream), joined(want, stream)
    assert torch.equal(gf, wf)
    torch.testing.assert_close(gl, wl, rtol=0, atol=0)
    assert got.stats == want.stats
    assert got.windows == want.windows and got.meta == want.meta
    np.testing.assert_array_equal(np.sort(got.sample_ids), np.sort(want.sample_ids))


@pytest.fixture
def store(tmp_path):
    uri = str(tmp_path / "store")
    for rank in (0, 1):
        write_store(uri, range(10), rank=rank)
    return uri


def test_bounded_join_equals_in_memory_with_duplicates_nans_and_a_skipped_shard(store, tmp_path):
    shard = tmp_path / "store" / "window=3" / "rank=0.arrow"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    stream = query_stream()
    want = SignalReader(store, on_corrupt="skip")
    got = BoundedSignalReader(store, memory_mb=BUDGET_MB, cache_dir=str(tmp_path / "cache"), on_corrupt="skip")
    # the test data does its job: replays in windows 2..9 except of the skipped shard's ids, and the early rows
    assert want.stats.duplicates == 7 * 10 + 20 and want.stats.corrupt_shards == 1
    assert got._num_segments >= 8 and got._parts_bits >= 2  # many segments and hash ranges, not one
    assert_same_join(got, want, stream)
    resident = sum(map(len, got._segments.values())) * resident_bytes_per_row(2)
    assert resident <= got.budget // 2 and got.segment_loads >= got._num_segments
    # a second reader of the same store reuses the index (no new build) and reports the same
    again = BoundedSignalReader(store, memory_mb=BUDGET_MB, cache_dir=str(tmp_path / "cache"), on_corrupt="skip")
    assert again.index_dir == got.index_dir and len(list((tmp_path / "cache").iterdir())) == 1
    assert_same_join(again, SignalReader(store, on_corrupt="skip"), stream)
    # the corrupt policy and expectations still hold against an index built by another reader
    with pytest.raises(SignalError, match=f"{shard}: checksum mismatch"):
        BoundedSignalReader(store, memory_mb=BUDGET_MB, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(SignalError, match="teacher version 'abc123' differs from the expected 'zzz'"):
        BoundedSignalReader(store, memory_mb=BUDGET_MB, cache_dir=str(tmp_path / "cache"), on_corrupt="skip",
                            teacher_version="zzz")


def test_refresh_takes_new_commits_and_stays_equal(store, tmp_path):
    got = BoundedSignalReader(store, memory_mb=BUDGET_MB, cache_dir=str(tmp_path / "cache"), windows=range(12))
    want = SignalReader(store, windows=range(12))
    for rank in (0, 1):
        write_store(store, range(10, 12), rank=rank)
    assert got.refresh() == want.refresh() == 4 and got.refresh() == 0
    assert_same_join(got, want, query_stream(seed=1))


def test_compacted_store(store, tmp_path):
    dst = str(tmp_path / "compacted")
    compact(store, dst)
    # a compacted partition holds a window of both ranks (~400 rows): 1000-row segments
    got = BoundedSignalReader(dst, memory_mb=1000 * segment_bytes_per_row(2) / 2**20, cache_dir=str(tmp_path / "c"))
    assert got._num_segments >= 4
    assert_same_join(got, SignalReader(dst), query_stream(seed=2))


def test_open_reader_picks_by_store_size(store, tmp_path):
    assert type(open_reader(store, memory_mb=None)) is SignalReader
    assert type(open_reader(store, memory_mb=64)) is SignalReader  # ~2.6K rows fit
    small = open_reader(store, memory_mb=BUDGET_MB, cache_dir=str(tmp_path / "c"))
    assert isinstance(small, BoundedSignalReader) and small.stats.rows == SignalReader(store).stats.rows
    empty = open_reader(str(tmp_path / "nothing"), memory_mb=BUDGET_MB, tasks=["ctr", "cvr"])
    assert empty.meta is None and not empty.lookup(torch.tensor([1, 2]))[1].any()


def test_student_joins_through_the_bounded_reader_as_through_the_in_memory_one(tmp_path):
    small = ["data.num_days=3", "data.samples_per_day=3000", "data.history_len=8", "data.batch_size=64",
             "data.prefetch=0", "data.world.num_users=100", "data.world.num_items=200", "student.history_len=4",
             "tracking.progress=false", "student.tower_loss=task+distill"]
    uri = str(tmp_path / "sig")
    info = write_oracle_signals(load_config(None, small), uri, corrupt={1: "nan", 3: "missing"})

    def join(extra: list[str]) -> tuple[StudentTrainer, list]:
        t = StudentTrainer(load_config(None, small + [f"student.signals_uri={uri}", *extra]), run_dir=tmp_path)
        return t, [t._signals(b) for b in t.loader(t.train_days, t.view)]

    mem, want = join([])
    budget = 300 * segment_bytes_per_row(len(mem.reader.meta.tasks)) / 2**20  # 300 rows per segment
    bounded, got = join([f"signals.reader_memory_mb={budget}", f"signals.reader_cache_dir={tmp_path / 'idx'}"])
    assert type(mem.reader) is SignalReader and isinstance(bounded.reader, BoundedSignalReader)
    assert bounded.reader._num_segments * 300 >= info["rows"] > 3 * 300
    assert len(got) == len(want) > 10
    for (gl, gm), (wl, wm) in zip(got, want, strict=True):
        assert torch.equal(gm, wm) and torch.equal(gl, wl)
    assert bounded.counts == mem.counts and bounded.counts.missing > 0 and bounded.counts.rejected_non_finite > 0
