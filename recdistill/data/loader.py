"""Batches from any data source: sampled view, sharded by rank, prepared ahead on a thread or in worker processes.

    from recdistill.data.loader import BatchLoader
    from recdistill.data.source import build_source
    src = build_source(cfg.data)
    for batch in BatchLoader(src, src.days()[:-1], 512, view=cfg.sampling.teacher, rank=r, world_size=w):
        ...
    loader = BatchLoader(src, days, 512, view=v, workers=2, device="cuda")   # 2 processes, pinned, prefetched
    for p in loader.stream(start=Position.from_state(saved)):                # resume where a checkpoint stood
        p.batch, p.start, p.end

**Work items.** Chunk c of a day (rows [c*chunk_rows, (c+1)*chunk_rows)) belongs to rank c % world_size, so ranks
never generate or read each other's rows. A rank's work items are its (day, chunk) pairs in order; each is read
through the sampling view (pushed down into the source: dropped rows never get a history) into one *part*.

**Batches.** Rows of a day run on from part to part and are cut every `batch_size` rows; a day's last batch may be
short (dropped with `drop_last`). Full batches inside a part are slices of it (views: offsets arithmetic, no
gather); only a batch that straddles parts is concatenated, from its pieces, once. After sampling, ranks can end a
day with a different number of batches; distributed trainers bound their steps (recdistill/train/lockstep.py).

**Positions.** Every batch comes with the :class:`Position` of its first row and of the row after its last: (day,
chunk, row offset among the chunk's viewed rows). A batch boundary is all the state there is (batches restart
every day and are cut every `batch_size` rows from a boundary), so a loader started at a batch's end position
yields exactly the batches that followed it: resuming costs one work item, not a replay of the consumed batches.

**Workers.** `workers=0`: parts are read and cut on one background thread, `prefetch` batches ahead. `workers=N`:
N processes (torch DataLoader over an IterableDataset) read the parts, worker w the items i with i % N == w; the
DataLoader hands results back round-robin in dispatch order and every worker yields exactly one part per item, so
the parts, and the batches cut from them here, are the same sequence for any N. Workers come from a fork server,
never from a fork of the training process and its threads, so the source is pickled to each (a source drops its
open files and locks in `__getstate__`), and each tunes its allocator as the training process does. A part's
tensors go to one shared-memory
arena of its worker (the world makes its histories there; the small tensors are copied in), which the worker
reuses once the training process has let go of every batch cut from it (recdistill/data/shared_pool.py): handing
a part over copies no history, sends one file descriptor, and after a worker's first few parts faults in no fresh
pages.

**CUDA.** With `device` a CUDA device, batches are pinned (with workers, the DataLoader pins each part and a sliced
batch keeps its history, dense and label tensors there; its small sparse ids and offsets are new, pageable tensors)
and each batch is copied to the device on a side stream one batch ahead of the consumer.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.context
import pickle
import queue
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from recdistill.config import SamplingConfig
from recdistill.data.batch import Batch, set_buffer_allocator
from recdistill.data.shared_pool import Releaser, WorkerArenas, new_flags
from recdistill.data.source import DataSource, check_nested, read_view


@dataclass(frozen=True)
class Position:
    """A point in one rank's batch stream: row `row` of the viewed rows of chunk `chunk` of day `day`.
    `day=None`: past the last work item (the stream is over)."""

    day: int | None
    chunk: int = 0
    row: int = 0

    def state(self) -> dict:
        """JSON-able form (what a checkpoint stores)."""
        return {"day": self.day, "chunk": self.chunk, "row": self.row}

    @staticmethod
    def from_state(state: dict) -> Position:
        return Position(None if state["day"] is None else int(state["day"]), int(state["chunk"]), int(state["row"]))


END = Position(None)


@dataclass(frozen=True)
class WorkItem:
    """Rows [start, stop) of `day` (chunk `chunk`), of whose viewed rows the first `skip` are already consumed."""

    day: int
    chunk: int
    start: int
    stop: int
    skip: int = 0


@dataclass
class Part:
    """The viewed rows of one work item from its `skip` on. From a worker: `lease` (worker, slot) and `arena` name
    the shared arena its tensors are in, until the training process starts watching it (shared_pool.Releaser)."""

    item: WorkItem
    batch: Batch
    lease: tuple[int, int] | None = None
    arena: torch.Tensor | None = None

    def pin_memory(self) -> Part:  # called by the DataLoader's pin-memory thread
        return Part(self.item, self.batch.pin_memory(), self.lease, self.arena)


@dataclass
class Positioned:
    """A batch with the position of its first row (`start`) and of the row after its last (`end`)."""

    batch: Batch
    start: Position
    end: Position


class BatchLoader:
    """Iterates fixed-size Batches of `days` from `source` for one rank, in a deterministic order (module docstring).

    `chunk_rows`: stored rows per work item (default 4 batches). `workers`: reader processes (0: one background
    thread; `prefetch` <= 0 then reads inline). `device`: with a
    CUDA device, batches come pinned and already on it (copied on a side stream); otherwise they stay on the CPU.
    `arena_slots`: shared-memory arenas per worker (recdistill/data/shared_pool.py), each as large as the largest
    part; 4 are in use with a consumer that keeps no batch (2 prefetched, 1 being made, 1 being cut), the rest
    serve a consumer that keeps a few; past that, parts go to fresh shared memory.
    """

    def __init__(self, source: DataSource, days: list[int], batch_size: int, *, view: SamplingConfig | None = None,
                 rank: int = 0, world_size: int = 1, chunk_rows: int | None = None, prefetch: int = 4,
                 drop_last: bool = False, workers: int = 0, device: torch.device | str | None = None,
                 arena_slots: int = 8) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if workers < 0:
            raise ValueError(f"workers={workers}: expected >= 0")
        missing = sorted(set(days) - set(source.days()))
        if missing:
            raise ValueError(f"days {missing} not in the data source (it has {source.days()})")
        if view is not None:
            binary = [t.name for t in source.schema.tasks if t.kind == "binary"]
            if view.task not in binary:
                raise ValueError(f"sampling view '{view.name}' decides positives by task '{view.task}', which is not a "
                                 f"binary task of this data (binary tasks: {binary}); set sampling.<view>.task")
            check_nested(view, source.sampling, source.schema.num_traffic)
        self.source, self.days, self.batch_size = source, list(days), batch_size
        self.view, self.rank, self.world_size = view, rank, world_size
        self.chunk_rows = chunk_rows or batch_size * 4
        self.prefetch, self.drop_last, self.workers = prefetch, drop_last, workers
        self.device = torch.device(device) if device is not None else None
        self.cuda = self.device is not None and self.device.type == "cuda" and torch.cuda.is_available()
        self.arena_slots = arena_slots

    # ---- work items and parts ------------------------------------------------------------------------------
    def items(self, start: Position | None = None) -> Iterator[WorkItem]:
        """This rank's work items from `start` (default: the beginning), in stream order."""
        if start == END:
            return
        days = self.days
        if start is not None:
            if start.day not in days or start.chunk % self.world_size != self.rank:
                raise ValueError(f"position {start.state()} is not one of rank {self.rank}'s (of {self.world_size}) "
                                 f"over days {days}")
            days = days[days.index(start.day):]
        for day in days:
            n = self.source.num_rows(day)
            first = start.chunk if start is not None and day == start.day else self.rank
            for c in range(first, -(-n // self.chunk_rows), self.world_size):
                skip = start.row if start is not None and (day, c) == (start.day, start.chunk) else 0
                yield WorkItem(day, c, c * self.chunk_rows, min((c + 1) * self.chunk_rows, n), skip)

    def read_part(self, item: WorkItem) -> Part:
        """One work item's viewed rows (the view pushed down into the source), from its `skip` on."""
        b = read_view(self.source, item.day, item.start, item.stop, self.view)
        return Part(item, b.slice(min(item.skip, len(b)), len(b)) if item.skip else b)

    def _parts(self, start: Position | None, workers: int) -> Iterator[Part]:
        if workers == 0:
            return (self.read_part(it) for it in self.items(start))
        flags = new_flags(workers, self.arena_slots)
        parts = DataLoader(_Parts(self, start, flags), batch_size=None, num_workers=workers, pin_memory=self.cuda,
                           multiprocessing_context=_worker_context(), prefetch_factor=2,
                           worker_init_fn=_init_worker)
        return _released(self._started(parts, workers), Releaser(flags))

    def _started(self, parts: DataLoader, workers: int) -> Iterator[Part]:
        """The DataLoader's parts. Starting its workers pickles the source to each: a source that cannot be pickled
        fails there, and the error says which one and what to do."""
        try:
            with warnings.catch_warnings():  # torch's own notice on this failure advises the fork start method
                warnings.filterwarnings("ignore", message="Got pickle error when attempting to start a worker")
                it = iter(parts)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:  # what pickle raises for such an object
            raise ValueError(f"data source {type(self.source).__qualname__} cannot be sent to the loader's {workers} "
                             f"worker process(es): {exc}. Make it picklable (drop open files and locks in "
                             "__getstate__) or set data.workers=0") from exc
        yield from it

    # ---- batches -------------------------------------------------------------------------------------------
    def _cut(self, parts: Iterable[Part], pin: bool) -> Iterator[Positioned]:
        """Cut the parts' rows into batches, day by day (module docstring); `pin`: pin the concatenated ones."""
        bs, held, held_n, start, end, day = self.batch_size, [], 0, END, END, None

        def joined() -> Batch:
            b = Batch.concat(held)
            return b.pin_memory() if pin and len(held) > 1 else b

        for part in parts:
            it, b = part.item, part.batch
            if held and it.day != day and not self.drop_last:
                yield Positioned(joined(), start, end)
            if it.day != day:
                held, held_n, day = [], 0, it.day
            n, at = len(b), 0
            if n == 0:
                continue
            if held:  # the batch that straddles parts: the held pieces and this part's head
                at = min(bs - held_n, n)
                held.append(b.slice(0, at))
                held_n += at
                end = Position(it.day, it.chunk, it.skip + at)
                if held_n < bs:
                    continue
                yield Positioned(joined(), start, end)
                held, held_n = [], 0
            while n - at >= bs:
                yield Positioned(b.slice(at, at + bs), Position(it.day, it.chunk, it.skip + at),
                                 Position(it.day, it.chunk, it.skip + at + bs))
                at += bs
            if at < n:
                held, held_n = [b.slice(at, n)], n - at
                start, end = Position(it.day, it.chunk, it.skip + at), Position(it.day, it.chunk, it.skip + n)
        if held and not self.drop_last:
            yield Positioned(joined(), start, end)

    def stream(self, start: Position | None = None, *, workers: int | None = None,
               prefetch: int | None = None) -> Iterator[Positioned]:
        """Batches with their positions from `start` (default: the beginning). `workers` / `prefetch` override the
        loader's (a resume reading one batch wants neither)."""
        workers = self.workers if workers is None else workers
        prefetch = self.prefetch if prefetch is None else prefetch
        if workers > 0:  # the DataLoader pins the parts; the straddling batches are pinned as they are joined
            out = self._cut(self._parts(start, workers), pin=self.cuda)
        else:
            out = self._pinned(self._cut(self._parts(start, 0), pin=False))
            if prefetch > 0:
                out = _background(out, prefetch)
        return _to_device(out, self.device) if self.cuda else out

    def _pinned(self, out: Iterator[Positioned]) -> Iterator[Positioned]:
        for p in out:
            yield replace(p, batch=p.batch.pin_memory()) if self.cuda else p

    def __iter__(self) -> Iterator[Batch]:
        return (p.batch for p in self.stream())


class _Parts(IterableDataset):
    """A DataLoader worker's share of the work items: those with index i % num_workers == its id, one part each, its
    tensors in one of the worker's shared arenas (`flags`: shared_pool.new_flags, shared with the workers)."""

    def __init__(self, loader: BatchLoader, start: Position | None, flags: torch.Tensor) -> None:
        self.loader, self.start, self.flags = loader, start, flags

    def __iter__(self) -> Iterator[Part]:
        info = get_worker_info()
        if info is None:  # iterated in this process (not through the DataLoader): plain parts
            yield from (self.loader.read_part(it) for it in self.loader.items(self.start))
            return
        wid, n = info.id, info.num_workers
        # torch logs a notice once per process at the first KeyedJaggedTensor (torch.fx.wrap's tracing check): the
        # training process has shown it already, and every worker of every pass would repeat it
        logging.getLogger("torch.fx._symbolic_trace").addFilter(lambda r: "is_fx_tracing" not in r.getMessage())
        arenas = WorkerArenas(self.flags[wid])
        set_buffer_allocator(arenas.alloc)
        for i, item in enumerate(self.loader.items(self.start)):
            if i % n == wid:
                arenas.begin()
                part = self.loader.read_part(item)
                part.batch = part.batch.map_tensors(arenas.place)
                lease = arenas.finish()
                if lease is not None:
                    part.lease, part.arena = (wid, lease[0]), lease[1]
                yield part


def _init_worker(_worker_id: int) -> None:
    """A loader worker's process settings: glibc's allocator tuned as in the training process (recdistill.runtime;
    the fork server's children start with glibc's defaults whatever the parent set). Untuned, a worker hands each
    part's multi-megabyte temporaries back to the OS and faults them in again for the next part (docs/LOG.md)."""
    from recdistill.runtime import tune_allocator

    tune_allocator()


def _worker_context() -> multiprocessing.context.BaseContext:
    """Where loader workers come from: a fork server (forked from one clean single-threaded process that has torch
    and this module imported), not a fork of the training process. Forking a process that runs other threads (the
    signal writer, gloo, a loader abandoned mid-stream, W&B) copies whatever locks those threads hold at that moment;
    a worker then waited on one for good (seen in the suite: in tempfile's lock, in an ABC check). The price is
    that the source is pickled to each worker."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "torch", "recdistill.data.loader"])  # ignored once the server runs
    return ctx


def _released(parts: Iterable[Part], releaser: Releaser) -> Iterator[Part]:
    """The parts, their arenas watched from here on: a slot is freed once nothing here refers to its arena."""
    for part in parts:
        releaser.sweep()
        if part.lease is not None:
            releaser.received(*part.lease, part.arena)
            part.arena = None
        yield part


def _to_device(items: Iterator[Positioned], device: torch.device) -> Iterator[Positioned]:
    """Each batch copied to the CUDA `device` on a side stream, one batch ahead of the consumer. The consumer's
    stream waits for that copy only (an event per batch), and the batch's memory is recorded on the consumer's
    stream so the caching allocator does not hand it out while the consumer's kernels may still read it."""
    side = torch.cuda.Stream(device)
    pending: tuple[Positioned, torch.cuda.Event] | None = None
    for p in items:
        with torch.cuda.stream(side):
            moved = replace(p, batch=p.batch.to(device, non_blocking=True))  # pinned: a true async copy
            done = torch.cuda.Event()
            done.record(side)
        if pending is not None:
            yield _ready(*pending, device)
        pending = (moved, done)
    if pending is not None:
        yield _ready(*pending, device)


def _ready(p: Positioned, done: torch.cuda.Event, device: torch.device) -> Positioned:
    current = torch.cuda.current_stream(device)
    current.wait_event(done)
    p.batch.record_stream(current)
    return p


_END = object()


def _background(gen: Iterator, depth: int) -> Iterator:
    """Run `gen` on a daemon thread, `depth` items ahead; its exceptions re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in gen:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            q.put(exc)

    t = threading.Thread(target=work, name="recdistill-loader", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
