"""The input pipeline (issue 16): view pushdown in every source, batches cut as slices, positions that resume a
stream where it stood, worker processes that give the same batches as one thread."""

import threading

import pytest
import torch
from helpers import assert_same_batch

from recdistill.config import load_config
from recdistill.data.batch import Batch
from recdistill.data.loader import END, BatchLoader, Position
from recdistill.data.movielens import MovieLensSource
from recdistill.data.parquet import ParquetSource, write_parquet
from recdistill.data.sampling import SamplingConfig
from recdistill.data.shared_pool import Releaser, WorkerArenas, new_flags
from recdistill.data.source import apply_view
from recdistill.data.world import SyntheticWorld

TEACHER = SamplingConfig(name="teacher", r=0.5, q=1.0)
STUDENT = SamplingConfig(name="student", r=0.1, q=0.9, q_eff=[0.9, 0.8, 0.7])  # nested in TEACHER


def small_world() -> SyntheticWorld:
    return SyntheticWorld(load_config(None, ["data.history_len=32", "data.samples_per_day=1500",
                                             "data.num_days=3"]).data)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Every built-in source: the world, Parquet files of it (unsampled, and the teacher's view), MovieLens."""
    root = tmp_path_factory.mktemp("pq")
    w = small_world()
    write_parquet(w, str(root / "all"), row_group_rows=400, progress=False)
    write_parquet(w, str(root / "teacher"), view=TEACHER, row_group_rows=300, progress=False)
    ml = MovieLensSource(load_config(None, ["data.history_len=20"]).data)
    return {"world": w, "parquet": ParquetSource(str(root / "all")),
            "parquet_teacher": ParquetSource(str(root / "teacher")), "movielens": ml}


#: (source, day, rows [start, stop)): ranges across row groups and files for Parquet, a busy MovieLens day
RANGES = {"world": (1, 130, 1290), "parquet": (1, 130, 1290), "parquet_teacher": (2, 40, 700),
          "movielens": (2, 3000, 4700)}
BY_CVR = SamplingConfig(name="by-cvr", r=0.2, q=1.0, task="cvr")  # positives are conversions
#: the views each source can take (a sampled file only nested ones)
VIEWS = {"parquet_teacher": [None, STUDENT], "world": [None, TEACHER, STUDENT, BY_CVR]}


@pytest.mark.parametrize("name", list(RANGES))
def test_view_pushdown_equals_apply_view(sources, name):
    src = sources[name]
    day, start, stop = RANGES[name]
    full = src.read(day, start, stop)
    for view in VIEWS.get(name, [None, TEACHER, STUDENT]):
        got = src.read(day, start, stop, view=view)
        assert_same_batch(got, apply_view(full, view, src.schema.num_traffic), f"{name} view {view and view.name}")
        assert view is None or 0 < len(got) < len(full)


@pytest.mark.parametrize("view", [STUDENT, BY_CVR], ids=["by-ctr", "by-cvr"])
def test_world_makes_other_labels_for_kept_rows_only(sources, monkeypatch, view):
    """A row the view drops costs the label it is dropped by: the logits of the other tasks only for kept rows."""
    w = sources["world"]
    real, seen = w._cvr_wt_logits, []
    monkeypatch.setattr(w, "_cvr_wt_logits", lambda latent: seen.append(len(latent["quality"])) or real(latent))
    kept = len(w.read(1, 0, 1000, view=view))
    assert kept < 500 and seen[-1] == kept and (len(seen) == 1) == (view.task == "ctr")


#: the method that turns a source's rows into histories, and the number of rows one call gets
HISTORY_MAKER = {"world": ("history", lambda user, *a: len(user)),
                 "parquet": ("_to_batch", lambda table, f: table.num_rows),
                 "movielens": ("_batch", lambda day, idx, rows, view: len(rows))}


@pytest.mark.parametrize("name", list(HISTORY_MAKER))
def test_pushdown_makes_histories_for_kept_rows_only(sources, name, monkeypatch):
    src = sources[name]
    day, start, stop = RANGES[name]
    method, rows_of = HISTORY_MAKER[name]
    real, seen = getattr(src, method), []

    def counted(*args):
        seen.append(rows_of(*args))
        return real(*args)

    monkeypatch.setattr(src, method, counted)
    kept = len(src.read(day, start, stop, view=STUDENT))
    assert sum(seen) == kept < 0.7 * (stop - start)  # MovieLens: 55% positives, kept at 0.9


def old_batches(src, days, bs, view, rank, world_size, chunk_rows, drop_last):
    """The loader's batching before slicing (concatenate the held rows, select a batch, select the rest): the
    reference its output must equal."""
    for day in days:
        buf, held, n = [], 0, src.num_rows(day)
        for c, start in enumerate(range(0, n, chunk_rows)):
            if c % world_size != rank:
                continue
            part = apply_view(src.read(day, start, min(start + chunk_rows, n)), view, src.schema.num_traffic)
            buf.append(part)
            held += len(part)
            while held >= bs:
                merged = Batch.concat(buf)
                yield merged.select(torch.arange(bs))
                buf, held = [merged.select(torch.arange(bs, held))], held - bs
        if held and not drop_last:
            yield Batch.concat(buf)


# (batch size, chunk rows, view, rank, world size, drop_last): parts of several batches; batches spanning many
# parts (r = 0.1, chunks not a multiple of the batch); no view; a dropped last batch per day
BATCHING = [(64, None, TEACHER, 0, 1, False), (50, 130, STUDENT, 1, 2, True), (100, None, None, 0, 1, False),
            (33, 70, TEACHER, 1, 3, False)]


@pytest.mark.parametrize("case", BATCHING, ids=["teacher", "student-2ranks-droplast", "unsampled", "3ranks"])
def test_sliced_batches_equal_the_concatenating_loader(sources, case):
    bs, chunk, view, rank, ws, drop = case
    w = sources["world"]
    want = list(old_batches(w, [0, 1], bs, view, rank, ws, chunk or 4 * bs, drop))
    got = list(BatchLoader(w, [0, 1], bs, view=view, rank=rank, world_size=ws, chunk_rows=chunk,
                           drop_last=drop, prefetch=2))
    assert len(got) == len(want) > 3
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert_same_batch(a, b, f"batch {i}")


def test_every_position_resumes_the_stream_exactly(sources, monkeypatch):
    """From the end position of batch k the loader yields batches k+1.. exactly, reading only the work items from
    that position on; from the start position of batch k, batch k first."""
    w = sources["world"]
    loader = BatchLoader(w, [0, 1, 2], 40, view=STUDENT, rank=1, world_size=2, chunk_rows=100, prefetch=0)
    full = list(loader.stream())
    assert len(full) > 8 and full[-1].end.day == 2 and full[0].start == Position(0, 1, 0)
    reads = []
    real = w.read
    monkeypatch.setattr(w, "read", lambda *a, **k: reads.append(a) or real(*a, **k))
    for k, p in enumerate(full):
        reads.clear()
        rest = list(loader.stream(p.end))
        assert len(reads) == len(list(loader.items(p.end)))  # no replay of the consumed work items
        assert [(q.start, q.end) for q in rest] == [(q.start, q.end) for q in full[k + 1:]]
        for i, (a, b) in enumerate(zip(rest, full[k + 1:], strict=True)):
            assert_same_batch(a.batch, b.batch, f"resumed after batch {k}: batch {k + 1 + i}")
        again = next(loader.stream(p.start))
        assert_same_batch(again.batch, p.batch, f"batch {k} from its start")
    assert list(loader.stream(END)) == []
    with pytest.raises(ValueError, match="is not one of rank 1's"):
        next(loader.stream(Position(1, 2, 0)))
    assert Position.from_state(full[3].end.state()) == full[3].end


@pytest.mark.parametrize("name", ["world", "parquet", "movielens"])
def test_workers_give_the_same_batches_as_one_thread(sources, name):
    src = sources[name]
    kw = dict(view=TEACHER, rank=0, world_size=2, chunk_rows=150)
    one = list(BatchLoader(src, [0, 1], 64, workers=0, **kw).stream())
    assert len(one) > 6
    for workers in (1, 2):
        got = list(BatchLoader(src, [0, 1], 64, workers=workers, **kw).stream())
        assert [(p.start, p.end) for p in got] == [(p.start, p.end) for p in one], workers
        for i, (a, b) in enumerate(zip(got, one, strict=True)):
            assert_same_batch(a.batch, b.batch, f"{workers} workers, batch {i}")
    resumed = list(BatchLoader(src, [0, 1], 64, workers=2, **kw).stream(one[2].end))
    assert [p.start for p in resumed] == [p.start for p in one[3:]]
    assert_same_batch(resumed[-1].batch, one[-1].batch, "resumed with 2 workers, last batch")


def test_workers_do_not_inherit_locks_held_here():
    """A lock the source uses, held here while the workers start (as another thread of a trainer may hold one): a
    forked worker would inherit it held and wait for good; a worker from the fork server gets the source pickled."""
    w = small_world()
    one = list(BatchLoader(w, [0], 64, view=TEACHER))
    got: list = []
    with w._pop_lock:  # the world's per-day cache lock: every read takes it
        reader = threading.Thread(target=lambda: got.extend(BatchLoader(w, [0], 64, view=TEACHER, workers=2)),
                                  daemon=True)
        reader.start()
        reader.join(timeout=120)
        assert not reader.is_alive(), "loader workers hung on a lock held in the training process"
    assert len(got) == len(one)
    for i, (a, b) in enumerate(zip(got, one, strict=True)):
        assert_same_batch(a, b, f"batch {i}")


def test_an_unpicklable_source_is_refused_with_workers():
    w = small_world()
    w.hook = lambda: None  # a local lambda: cannot be pickled to a worker
    assert len(list(BatchLoader(w, [0], 64, workers=0))) > 0
    with pytest.raises(ValueError, match=r"SyntheticWorld cannot be sent to the loader's 2 worker.*data\.workers=0"):
        next(iter(BatchLoader(w, [0], 64, workers=2)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned host batches and the side-stream copy")
def test_cuda_batches_arrive_on_the_device_equal():
    w = small_world()
    cpu = list(BatchLoader(w, [0], 64, view=TEACHER, prefetch=0))
    for workers in (0, 2):
        got = list(BatchLoader(w, [0], 64, view=TEACHER, workers=workers, device="cuda"))
        assert all(b.sample_id.is_cuda and b.history.fields["item"].is_cuda for b in got)
        for i, (a, b) in enumerate(zip(got, cpu, strict=True)):
            assert_same_batch(a.to("cpu"), b, f"{workers} workers, batch {i}")


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_arenas_are_reused_and_never_while_a_batch_is_held(sources, monkeypatch, workers):
    """Many work items over 3 arenas per worker: arenas are reused, every batch equals the one-thread batch when it
    arrives, and batches the consumer keeps are unchanged at the end (a reused arena would overwrite them)."""
    w = sources["world"]
    kw = dict(view=TEACHER, chunk_rows=60)
    one = list(BatchLoader(w, [0, 1], 40, workers=0, **kw))
    leases = []
    real = Releaser.received
    monkeypatch.setattr(Releaser, "received", lambda self, wk, s, a: leases.append((wk, s)) or real(self, wk, s, a))
    kept = []
    for i, b in enumerate(BatchLoader(w, [0, 1], 40, workers=workers, arena_slots=3, **kw)):
        assert_same_batch(b, one[i], f"{workers} workers, batch {i} on arrival")
        if i % 5 == 0:
            kept.append((i, b))
    assert i == len(one) - 1 and len(leases) > 3 * workers
    assert len(set(leases)) < len(leases), "no arena was reused"
    for i, b in kept:
        assert_same_batch(b, one[i], f"{workers} workers, kept batch {i} at the end")


def test_a_consumer_keeping_every_batch_gets_fresh_memory_past_the_arenas(sources):
    w = sources["world"]
    kw = dict(view=STUDENT, chunk_rows=50)
    one = list(BatchLoader(w, [0, 1], 10, workers=0, **kw))
    got = list(BatchLoader(w, [0, 1], 10, workers=2, arena_slots=2, **kw))
    assert len(got) == len(one) > 20
    for i, (a, b) in enumerate(zip(got, one, strict=True)):
        assert_same_batch(a, b, f"batch {i}")


def test_worker_arenas_place_a_part_and_free_a_slot_only_once_released():
    """In one process; the training process's own mapping of an arena is stood in for by a copy (`mapped`)."""
    flags = new_flags(1, 2)
    arenas, releaser = WorkerArenas(flags[0]), Releaser(flags)
    arenas.begin()  # first part: no size known yet, fresh shared memory
    a = arenas.alloc(1000)
    assert a.is_shared() and arenas.place(a) is a and arenas.finish() is None and flags.tolist() == [[0, 0]]
    arenas.begin()
    h = arenas.alloc(900)
    small = arenas.place(torch.arange(10, dtype=torch.int32))
    h.fill_(7)
    slot, arena = arenas.finish()
    base = arena.untyped_storage().data_ptr()
    same = lambda t: t.untyped_storage().data_ptr() == base  # noqa: E731
    assert same(h) and same(small) and small.tolist() == list(range(10)) and h.data_ptr() % 64 == 0
    assert flags[0, slot] == 1
    mapped = arena.clone()
    releaser.received(0, slot, mapped)
    held = mapped[10:20]  # a batch cut from the part, still held by the consumer
    del mapped
    releaser.sweep()
    assert flags[0, slot] == 1
    arenas.begin()
    assert arenas.slot != slot  # the held slot is not handed out again
    assert arenas.finish() is None  # nothing placed: the slot is free again at once
    del held
    releaser.sweep()
    assert flags.tolist() == [[0, 0]]
    arenas.begin()
    assert arenas.slot == slot
    big = arenas.alloc(5000)  # more than the arena holds: fresh memory, and the arena grows at the slot's next use
    assert not same(big) and big.is_shared()
    assert arenas.finish()[0] == slot
    flags[0, slot] = 0  # released
    arenas.begin()
    assert arenas.slot == slot and arenas.arenas[slot].numel() >= 5000 * 8
