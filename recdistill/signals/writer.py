"""The teacher's signal writer: one per rank, windowed, asynchronous, crash-safe (DESIGN §4 'Signal store').

    with SignalWriter(cfg.signals.uri, rank, meta, window_steps=cfg.signals.window_steps) as w:
        for step, batch in ...:
            logits = model(batch)                     # raw, pre-debias
            w.write(batch.sample_id, logits, step)    # no device sync; commits window step // window_steps - 1
                                                      # when the first step of the next window arrives
    # or explicitly: w.begin_window(W); w.write(...); ...; w.commit_window()

Training thread: `write` starts a non-blocking device-to-host copy into pinned memory and records a CUDA event
(on CPU it copies, since the trainer may reuse its tensors) and appends it to a local buffer; every
`handoff_rows` rows (and at commit/flush) the buffer goes onto a bounded queue (a full queue blocks:
backpressure, time counted in `stats.blocked_s`). A background thread waits on the events, gathers a
window's rows, and at `commit_window` writes the Arrow IPC shard and *then* the commit marker (atomic: a
single put on object stores, temp + rename on local files). Errors of the background thread re-raise on the
training thread at its next call.

Restarts: a new writer (same uri and rank) lists its committed windows (`is_committed(W)` is a set lookup),
removes its shard and temp files that no commit vouches for, and drops writes into committed windows (counted in
`stats.rows_dropped_committed`), so a teacher that replays steps never duplicates a committed row. Rows written
after the last commit die with the process: checkpoint the teacher right after a commit (`commit_window` then
`flush`), and the restarted run rewrites the uncommitted window from its start. Replaying from a checkpoint
taken mid-window would store the rows before the checkpoint nowhere, and re-forwarding them would not be an
out-of-sample prediction any more. Process crashes are covered; durability against power loss (fsync) is not.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import torch

from recdistill.signals.schema import (
    COMMITS,
    Commit,
    SignalMeta,
    arrow_schema,
    checksum,
    commit_path,
    parse_commit_name,
    parse_shard_name,
    shard_path,
)

_COMMIT, _STOP = object(), object()


@dataclass
class WriterStats:
    """Counters of one writer."""

    rows_written: int = 0
    rows_dropped_committed: int = 0  # writes into an already committed window (replay after restart)
    windows_committed: int = 0
    bytes_written: int = 0
    blocked_s: float = 0.0  # time write() waited on a full queue
    write_s: float = 0.0  # training-thread time inside write() (copies, hand-offs, blocking included)
    serializer_cpu_s: float = 0.0  # CPU time of the background thread (the core it takes from others)
    orphans_removed: int = 0


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes | pa.Buffer) -> None:
    """Write `data` so that readers see all of it or nothing: temp file + rename on local files, a single put
    elsewhere (object stores and the memory filesystem replace whole objects)."""
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"  # a crash leaves this name; the restarted writer removes it
        with fs.open(tmp, "wb") as f:
            f.write(data)  # an Arrow buffer goes through the buffer protocol: no copy into a bytes object
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data if isinstance(data, bytes) else data.to_pybytes())


class SignalWriter:
    """Windowed asynchronous writer of one rank's raw teacher logits (see module docstring)."""

    def __init__(self, uri: str, rank: int, meta: SignalMeta, queue_size: int = 8, handoff_rows: int = 65536,
                 window_steps: int | None = None,
                 on_commit: Callable[[Commit, pa.Table], None] | None = None) -> None:
        """`window_steps`: window = step // window_steps, committed automatically when a later window starts
        (None: call begin_window / commit_window yourself). `queue_size`: hand-offs in flight before `write`
        blocks. `handoff_rows`: rows buffered on the training thread per hand-off. `on_commit(commit, table)`:
        called on the background thread after each commit marker is written, with the committed rows (the hook
        for stream backends that publish committed windows; an exception in it surfaces like any background
        error)."""
        if window_steps is not None and window_steps < 1:
            raise ValueError(f"window_steps must be >= 1, got {window_steps}")
        self.fs, root = fsspec.core.url_to_fs(uri)
        self.uri, self.root, self.rank, self.meta = uri, root.rstrip("/"), rank, meta
        self.window_steps, self.on_commit = window_steps, on_commit
        self.schema = arrow_schema(meta)
        self.stats = WriterStats()
        self.committed = self._committed_windows()
        self._remove_orphans()
        self.window: int | None = None
        # Steps are copied into a staging chunk on the training thread and handed to the serializer every
        # `handoff_rows` rows: one queue round-trip per chunk instead of per step, and the chunk is already the
        # contiguous column the Arrow record batch wraps without another copy.
        self.handoff_rows = handoff_rows
        self._chunk: _Chunk | None = None
        self._free: collections.deque[_Chunk] = collections.deque(maxlen=queue_size + 2)  # written, reusable
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._serialize, name=f"signal-writer-{rank}", daemon=True)
        self._thread.start()
        self._closed = False

    # ---- restart bookkeeping -------------------------------------------------------------------------------
    def _committed_windows(self) -> set[int]:
        d = f"{self.root}/{COMMITS}"
        self.fs.invalidate_cache(self.root)
        names = self.fs.ls(d, detail=False) if self.fs.exists(d) else []
        return {w for w, r in (parse_commit_name(n) or (None, None) for n in names) if r == self.rank}

    def _remove_orphans(self) -> None:
        """Delete this rank's shard files that no commit marker vouches for, and its temp files (shards and
        markers) of interrupted writes. Other ranks' files are theirs to clean."""
        if not self.fs.exists(self.root):
            return
        for path in self.fs.find(self.root):
            base, tmp = path.split(".tmp-")[0], ".tmp-" in path
            parsed = parse_commit_name(base) if f"/{COMMITS}/" in path else parse_shard_name(base)
            if parsed is None or parsed[1] != self.rank:
                continue
            if tmp or (f"/{COMMITS}/" not in path and parsed[0] not in self.committed):
                self.fs.rm(path)
                self.stats.orphans_removed += 1

    def is_committed(self, window: int) -> bool:
        """Whether `window` of this rank is committed, or sealed by `commit_window` (cheap: a set lookup)."""
        return window in self.committed

    # ---- training-thread API ---------------------------------------------------------------------------------
    def _check(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"signal writer (rank {self.rank}) background error: {err!r}") from err

    def begin_window(self, window: int) -> None:
        """Start collecting rows for `window` (writes are dropped if it is already committed); an open window
        of another number is committed first (its rows would otherwise never reach the store)."""
        self._check()
        if self.window is not None and self.window != window:
            self.commit_window()
        self.window = window

    def write(self, sample_ids: torch.Tensor, logits: torch.Tensor, step: int) -> None:
        """Queue one step's raw logits [B, num_tasks] for its sample ids [B]. No device synchronisation."""
        self._check()
        t0 = time.perf_counter()
        if self.window_steps is not None and step // self.window_steps != self.window:
            if self.window is not None:
                self.commit_window()
            self.begin_window(step // self.window_steps)
        if self.window is None:
            raise RuntimeError("SignalWriter.write before begin_window (or give window_steps)")
        b = int(sample_ids.shape[0])
        if logits.dim() != 2 or logits.shape[1] != len(self.meta.tasks) or logits.shape[0] != b:
            raise ValueError(f"logits must be [B, {len(self.meta.tasks)}] for {b} sample ids, got "
                             f"{tuple(logits.shape)}")
        if self.window in self.committed:
            self.stats.rows_dropped_committed += b
            return
        cuda = logits.is_cuda or sample_ids.is_cuda
        c = self._chunk
        if c is None or c.n + b > c.capacity or c.pinned != cuda:
            self._handoff()
            c = self._chunk = self._new_chunk(max(self.handoff_rows, b), cuda)
        # The copy into the staging chunk is the one copy the trainer's tensors need (it may reuse them); on CUDA
        # it is a non_blocking copy into pinned memory plus an event the serializer waits on, never a sync here.
        c.ids[c.n:c.n + b].copy_(sample_ids, non_blocking=cuda)
        c.logits[c.n:c.n + b].copy_(logits.detach(), non_blocking=cuda)
        c.steps[c.n:c.n + b].fill_(step)
        if cuda:
            event = torch.cuda.Event()
            event.record()
            c.events.append(event)
        c.n += b
        c.step_min, c.step_max = min(c.step_min, step), max(c.step_max, step)
        if c.n >= self.handoff_rows:
            self._handoff()
        self.stats.write_s += time.perf_counter() - t0

    def _new_chunk(self, capacity: int, pinned: bool) -> _Chunk:
        """A recycled chunk when one fits: fresh memory costs a page fault per 4 KiB at first touch, which on
        the training thread is several times the copy itself."""
        try:
            c = self._free.pop()
        except IndexError:
            c = None
        if c is None or c.capacity < capacity or c.pinned != pinned:
            c = _Chunk(capacity, len(self.meta.tasks), pinned)
        c.reset(self.window)
        return c

    def _handoff(self) -> None:
        if self._chunk is not None and self._chunk.n:
            self._put(self._chunk)
        self._chunk = None

    def commit_window(self) -> None:
        """Seal the current window: its shard, then its commit marker, are written in the background."""
        self._check()
        if self.window is not None and self.window not in self.committed:
            self._handoff()
            self._put((_COMMIT, self.window))
            self.committed.add(self.window)  # later writes to it are replays
        self.window = None

    def flush(self) -> None:
        """Wait until everything handed off so far is processed (sealed windows are then committed on the store);
        re-raise a background error. Rows of the open window stay in memory until its commit."""
        self._handoff()
        self._queue.join()
        self._check()

    def close(self, commit: bool = True) -> None:
        """Commit the open window (if `commit`; the context manager passes False when leaving on an exception, so
        a failed step never seals a partial window), drain the queue and stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if commit and self.window is not None:
                self.commit_window()
        finally:
            self._chunk = None  # without commit, uncommitted rows are dropped
            self._queue.put(_STOP)  # the thread always drains (after an error without doing work), so this returns
            self._thread.join()
        self._check()

    def __enter__(self) -> SignalWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:  # noqa: ANN001
        self.close(commit=exc_type is None)

    def _put(self, item) -> None:  # noqa: ANN001
        t0 = time.perf_counter()
        while True:
            if self._error is not None or not self._thread.is_alive():
                self._check()
                raise RuntimeError(f"signal writer (rank {self.rank}) thread is not running")
            try:
                self._queue.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        self.stats.blocked_s += time.perf_counter() - t0

    # ---- background serializer -----------------------------------------------------------------------------
    def _serialize(self) -> None:
        pending: dict[int, list[_Chunk]] = {}
        while True:
            item = self._queue.get()
            t0 = time.thread_time()
            try:
                if item is _STOP:
                    return
                if self._error is None:  # after an error, drain without doing work
                    if isinstance(item, tuple) and item[0] is _COMMIT:
                        self._write_shard(item[1], pending.pop(item[1], []))
                    else:
                        for event in item.events:
                            event.synchronize()  # waits for this chunk's copies only, on this thread
                        pending.setdefault(item.window, []).append(item)
            except BaseException as exc:  # noqa: BLE001 - surfaced on the training thread
                self._error = exc
            finally:
                self.stats.serializer_cpu_s += time.thread_time() - t0
                self._queue.task_done()

    def _write_shard(self, window: int, chunks: list[_Chunk]) -> None:
        t = len(self.meta.tasks)
        rows = sum(c.n for c in chunks)
        steps = (min((c.step_min for c in chunks), default=-1), max((c.step_max for c in chunks), default=-1))
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, self.schema) as w:
            for c in chunks:  # numpy views of the staging tensors: Arrow wraps them, the IPC write is the copy
                w.write_batch(pa.record_batch([
                    pa.array(c.ids[:c.n].numpy()),
                    pa.FixedSizeListArray.from_arrays(pa.array(c.logits[:c.n].numpy().reshape(-1)), t),
                    pa.array(c.steps[:c.n].numpy())], schema=self.schema))
        data = sink.getvalue()
        # Their rows are in `data` now: back to the training thread (deque appends are thread-safe). Nothing of
        # a chunk may be read after this line, the trainer refills it at once.
        self._free.extend(chunks)
        atomic_write(self.fs, shard_path(self.root, window, self.rank), data)
        commit = Commit(window=window, rank=self.rank, rows=rows, checksum=checksum(data), nbytes=len(data),
                        step_min=steps[0], step_max=steps[1], meta=self.meta)
        self._write_marker(commit)
        self.stats.rows_written += rows
        self.stats.bytes_written += data.size
        self.stats.windows_committed += 1
        if self.on_commit is not None:
            self.on_commit(commit, pa.ipc.open_file(data).read_all())  # zero-copy view of the shard's bytes

    def _write_marker(self, commit: Commit) -> None:
        """The last act of a commit (background thread, after the shard is on the store): the marker that makes
        the window visible to readers. Until it is written the shard is an orphan the next writer removes."""
        atomic_write(self.fs, commit_path(self.root, commit.window, self.rank), commit.to_json().encode())


class _Chunk:
    """Up to `capacity` rows of one window, staged contiguously (pinned host memory when the source is CUDA)."""

    def __init__(self, capacity: int, num_tasks: int, pinned: bool) -> None:
        self.capacity, self.pinned = capacity, pinned
        self.ids = torch.empty(capacity, dtype=torch.int64, pin_memory=pinned)
        self.logits = torch.empty((capacity, num_tasks), dtype=torch.float32, pin_memory=pinned)
        self.steps = torch.empty(capacity, dtype=torch.int64)

    def reset(self, window: int) -> None:
        self.window, self.n, self.events = window, 0, []
        self.step_min, self.step_max = 2**63 - 1, -(2**63)
