"""The teacher's signal writer: one per rank, windowed, asynchronous, crash-safe (DESIGN §4 'Signal store').

    with SignalWriter(cfg.signals.uri, rank, meta) as w:
        w.begin_window(0)
        for step, batch in ...:
            logits = model(batch)                     # raw, pre-debias
            w.write(batch.sample_id, logits, step)    # no device sync: async copy + event, then queued
            ...
            if end_of_window: w.commit_window(); w.begin_window(next)

Training thread: `write` starts a non-blocking device-to-host copy into pinned memory and records a CUDA event
(on CPU it copies, since the trainer may reuse its tensors) and appends it to a local buffer; every
`handoff_rows` rows (and at commit/flush) the buffer goes onto a bounded queue (a full queue blocks:
backpressure, time counted in `stats.blocked_s`). A background thread waits on the events, gathers a
window's rows, and at `commit_window` writes the Arrow IPC shard and *then* the commit marker (atomic: a
single put on object stores, temp + rename on local files). Errors of the background thread re-raise on the
training thread at its next call. A restarted writer (same uri and rank) removes its uncommitted shard files and
drops writes into windows that are already committed, so a replayed window never duplicates rows.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import torch

from recdistill.signals.schema import (
    COMMITS,
    Commit,
    SignalMeta,
    arrow_schema,
    commit_path,
    parse_commit_name,
    parse_shard_name,
    sha256,
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
    orphans_removed: int = 0


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` so that readers see all of it or nothing: temp file + rename where rename exists locally,
    a single put elsewhere (object stores and the memory filesystem replace whole objects)."""
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


class SignalWriter:
    """Windowed asynchronous writer of one rank's raw teacher logits (see module docstring)."""

    def __init__(self, uri: str, rank: int, meta: SignalMeta, queue_size: int = 8, handoff_rows: int = 65536) -> None:
        self.fs, root = fsspec.core.url_to_fs(uri)
        self.uri, self.root, self.rank, self.meta = uri, root.rstrip("/"), rank, meta
        self.schema = arrow_schema(meta)
        self.stats = WriterStats()
        self.committed = self._committed_windows()
        self._remove_orphans()
        self.window: int | None = None
        # Steps are buffered on the training thread (a list append) and handed to the serializer in chunks of
        # about `handoff_rows`: one queue round-trip per chunk instead of per step keeps the hot path at a copy.
        self.handoff_rows = handoff_rows
        self._buffer: list = []
        self._buffered_rows = 0
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._serialize, name=f"signal-writer-{rank}", daemon=True)
        self._thread.start()
        self._before_commit = None  # test hook: called after the shard is written, before its commit marker

    # ---- restart bookkeeping -------------------------------------------------------------------------------
    def _committed_windows(self) -> set[int]:
        d = f"{self.root}/{COMMITS}"
        names = self.fs.ls(d, detail=False) if self.fs.exists(d) else []
        return {w for w, r in (parse_commit_name(n) or (None, None) for n in names) if r == self.rank}

    def _remove_orphans(self) -> None:
        """Delete this rank's shard files (and temp files) that no commit marker vouches for."""
        if not self.fs.exists(self.root):
            return
        for path in self.fs.find(self.root):
            if f"/{COMMITS}/" in path:
                continue
            parsed = parse_shard_name(path.split(".tmp-")[0])
            if parsed and parsed[1] == self.rank and (parsed[0] not in self.committed or ".tmp-" in path):
                self.fs.rm(path)
                self.stats.orphans_removed += 1

    def is_committed(self, window: int) -> bool:
        """Whether `window` of this rank is committed (cheap: a set lookup)."""
        return window in self.committed

    # ---- training-thread API ---------------------------------------------------------------------------------
    def _check(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"signal writer (rank {self.rank}) background error: {err!r}") from err

    def begin_window(self, window: int) -> None:
        """Start collecting rows for `window` (writes are dropped if it is already committed)."""
        self._check()
        self.window = window

    def write(self, sample_ids: torch.Tensor, logits: torch.Tensor, step: int) -> None:
        """Queue one step's raw logits [B, num_tasks] for its sample ids [B]. No device synchronisation."""
        self._check()
        if self.window is None:
            raise RuntimeError("SignalWriter.write before begin_window")
        if logits.dim() != 2 or logits.shape[1] != len(self.meta.tasks) or logits.shape[0] != sample_ids.shape[0]:
            raise ValueError(f"logits must be [B, {len(self.meta.tasks)}] for {sample_ids.shape[0]} sample ids, got "
                             f"{tuple(logits.shape)}")
        if self.window in self.committed:
            self.stats.rows_dropped_committed += int(sample_ids.shape[0])
            return
        if logits.is_cuda:
            ids_h = torch.empty(sample_ids.shape, dtype=torch.int64, pin_memory=True)
            log_h = torch.empty(logits.shape, dtype=torch.float32, pin_memory=True)
            ids_h.copy_(sample_ids, non_blocking=True)
            log_h.copy_(logits.detach(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            item = (self.window, step, ids_h, log_h, event)
        else:
            item = (self.window, step, sample_ids.to(torch.int64, copy=True),
                    logits.detach().to(torch.float32, copy=True), None)
        self._buffer.append(item)
        self._buffered_rows += int(sample_ids.shape[0])
        if self._buffered_rows >= self.handoff_rows:
            self._handoff()

    def _handoff(self) -> None:
        if self._buffer:
            self._put(self._buffer)
            self._buffer, self._buffered_rows = [], 0

    def commit_window(self) -> None:
        """Seal the current window: its shard, then its commit marker, are written in the background."""
        self._check()
        if self.window is not None and self.window not in self.committed:
            self._handoff()
            self._put((_COMMIT, self.window))
            self.committed.add(self.window)  # later writes to it are replays
        self.window = None

    def flush(self) -> None:
        """Wait until everything written so far has reached the serializer; re-raise a background error."""
        self._handoff()
        self._queue.join()
        self._check()

    def close(self, commit: bool = True) -> None:
        """Commit the open window (if `commit`), drain the queue and stop the thread."""
        try:
            if commit and self.window is not None:
                self.commit_window()
            self._buffer, self._buffered_rows = [], 0  # without commit, uncommitted rows are dropped
            self._put(_STOP)
            self._thread.join()
        finally:
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
        pending: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is None:  # after an error, drain without doing work
                    if isinstance(item, tuple) and item[0] is _COMMIT:
                        self._write_shard(item[1], pending.pop(item[1], []))
                    else:
                        for window, step, ids, logits, event in item:
                            if event is not None:
                                event.synchronize()  # waits for this copy only, on this thread
                            pending.setdefault(window, []).append((step, ids, logits))
            except BaseException as exc:  # noqa: BLE001 - surfaced on the training thread
                self._error = exc
            finally:
                self._queue.task_done()

    def _write_shard(self, window: int, parts: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        ids = np.concatenate([p[1].numpy() for p in parts]) if parts else np.zeros(0, np.int64)
        logits = np.concatenate([p[2].numpy() for p in parts]) if parts else np.zeros((0, len(self.meta.tasks)),
                                                                                         np.float32)
        steps = np.concatenate([np.full(len(p[1]), p[0], np.int64) for p in parts]) if parts else ids
        table = pa.table({"sample_id": pa.array(ids, pa.int64()),
                          "logits": pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1), pa.float32()),
                                                                      len(self.meta.tasks)),
                          "teacher_step": pa.array(steps, pa.int64())}, schema=self.schema)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, self.schema) as w:
            w.write_table(table)
        data = sink.getvalue().to_pybytes()
        atomic_write(self.fs, shard_path(self.root, window, self.rank), data)
        if self._before_commit is not None:
            self._before_commit(window)
        commit = Commit(window=window, rank=self.rank, rows=len(ids), sha256=sha256(data), nbytes=len(data),
                        step_min=int(steps.min()) if len(steps) else -1,
                        step_max=int(steps.max()) if len(steps) else -1, meta=self.meta)
        atomic_write(self.fs, commit_path(self.root, window, self.rank), commit.to_json().encode())
        self.stats.rows_written += len(ids)
        self.stats.bytes_written += len(data)
        self.stats.windows_committed += 1
