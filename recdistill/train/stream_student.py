"""The streaming student: a StudentTrainer fed by the joined stream (DESIGN §4 'Streams', docs/STREAMS.md).

    student = StreamingStudent(StudentTrainer(cfg, run_dir=d, open_store=False), open_stream(cfg.stream, "joined"),
                               init_from=batch_checkpoint)
    student.run()      # poll until the stream has nothing more, train, checkpoint, commit
    student.finish()   # train the rows left short of a batch, checkpoint, commit

**Features.** A joined record carries the sample's id, labels, traffic and day, not its features. The synthetic world
is a pure function of (seed, sample_id), so the student rebuilds each row with `source.read_ids` (a source without
it cannot feed a streaming student; a real deployment would put a feature-store lookup there). This is simpler and
as correct as carrying features in the sample stream: no jagged history columns in every stream, and the rows are
exactly those the batch phase would have read. Labels are taken from the record, as a real stream delivers them.

**Which rows.** The joined stream carries the teacher's view; the student keeps the rows of its own (nested) view,
a deterministic function of (sample id, label, traffic), so every student population can share one joined stream.
Re-deliveries are dropped by a DuplicateFilter (saved in the checkpoint). Rows without a signal (`has_signal`
false: the teacher was late or stalled) train both towers on labels only (counted as `stream/label_only`); signals
go through the batch phase's non-finite rejection and quality gate (StudentTrainer.gate).

**Malformed rows** (a null or NaN label, a traffic source the data lacks, a signal without its `num_tasks` logits,
an id the source cannot rebuild, a missing column: recdistill/streams/validate.py) are dead-lettered on the joined
stream with their reason before anything else sees them, logged by sample id and counted (`stream/dead_lettered`);
their positions are committed with the poll, so they are not delivered again once a checkpoint holds it. Records the
backend cannot even read (undecodable, no key columns, a column of another type) it puts aside itself
(`stream/dead_lettered_by_backend`, this process only). Training goes on either way.

**Delivery.** Rows are trained in batches of the student's batch size, cut in stream order. A checkpoint is taken
at a poll boundary once `student.checkpoint_every` steps have passed since the last: it holds the weights, the
stream position *after* the polls trained (`Stream.state_after`), the rows polled but short of a batch, and the
dedup window; only then are the polls' cursors committed. So a student killed at any point resumes at exactly the
rows its weights have not seen: the rows trained after the last checkpoint are delivered again and trained again
(their effect was lost with the process), and a crash between the checkpoint and the commit re-delivers rows the
restored dedup window drops (counted in `stream/redelivered`). The at-least-once window is therefore at most
`checkpoint_every` steps plus one poll, and no row is trained twice into the final weights.

**Materialisation** (`materialise_uri`): the signals of the rows trained (raw logits, as consumed) are written into
the batch signal store layout ({uri}/window=W/rank=0.arrow + commit markers, recdistill/signals/writer.py), one window
per checkpoint, committed just before it; a later batch student reading that store sees the same supervision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from recdistill.data.sampling import keep_mask
from recdistill.signals.schema import SignalMeta
from recdistill.signals.writer import SignalWriter
from recdistill.streams.base import Cursor, DuplicateFilter, Stream, column_np, poll_new_rows
from recdistill.streams.validate import RecordCheck, split_malformed
from recdistill.train import student_checkpoint as ckpt
from recdistill.train.student import SignalCounts, StudentTrainer

PENDING = "pending.arrow"


@dataclass
class StreamCounts:
    """Rows of the joined stream as the student saw them."""

    polled: int = 0
    redelivered: int = 0  # dropped by the DuplicateFilter
    outside_view: int = 0  # teacher-view rows the student's own view drops
    dead_lettered: int = 0  # malformed rows put aside (recdistill/streams/validate.py)
    trained: int = 0
    with_signal: int = 0  # trained rows that came with a teacher signal (before the gate)
    label_only: int = 0  # trained rows without one


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table.unify_dictionaries())
    return sink.getvalue().to_pybytes()


class StreamingStudent:
    """Trains `trainer` on the joined stream `joined` (see module docstring).

    init_from: a batch-phase checkpoint to start from (weights and optimizer) when student.checkpoint_dir holds no
    streaming checkpoint yet. dedup_horizon_ms: event time for which re-deliveries are recognised.
    """

    def __init__(self, trainer: StudentTrainer, joined: Stream, *, init_from: str | Path | None = None,
                 materialise_uri: str | None = None, dedup_horizon_ms: int = 86_400_000,
                 poll_rows: int | None = None) -> None:
        self.t, self.stream = trainer, joined
        cfg = trainer.cfg
        if not hasattr(trainer.source, "read_ids"):
            raise TypeError(f"data.source={cfg.data.source} cannot rebuild samples by id (no read_ids): the streaming "
                            "student needs a source that can")
        self.distill = trainer.s.tower_loss != "task"
        self.tasks = list(trainer.source.schema.task_names)
        if self.distill:
            trainer.use_stream_signals(self.tasks, cfg.sampling.teacher)
        self.bs = trainer.batch_size
        self.poll_rows = poll_rows or 16 * self.bs
        self.dedup = DuplicateFilter(dedup_horizon_ms)
        self.check = RecordCheck(labels=[f"label_{t}" for t in self.tasks], traffic_sources=trainer.num_traffic,
                                 has_signal=True, logits=len(self.tasks) if self.distill else None,
                                 known_ids=getattr(trainer.source, "known_ids", None))
        self.counts = StreamCounts()
        self.buffer: pa.Table | None = None  # polled rows of the student's view not yet trained
        self.uncommitted: list[Cursor] = []
        self.window = 0  # materialised signal window being written: one per checkpoint
        self.resumed_from = self._resume(init_from)
        self.writer = None
        if materialise_uri is not None:
            meta = SignalMeta(run_id=f"stream-{trainer.name}", teacher_version="stream", tasks=self.tasks,
                              sampling=cfg.sampling.teacher)
            self.writer = SignalWriter(materialise_uri, 0, meta)
        self.saved_step = self.t.steps  # the steps a checkpoint (or nothing, at step 0) already holds

    # ---- resume --------------------------------------------------------------------------------------------------
    def _resume(self, init_from: str | Path | None) -> Path | None:
        s = self.t.s
        path = ckpt.newest(s.checkpoint_dir) if s.resume else None
        if path is not None:
            state, dedup = self.t.load_checkpoint(path, digest=None)
            if state.get("phase") == "stream":
                self.stream.load_state_dict(state["stream"])
                self.counts = StreamCounts(**state["stream_counts"])
                self.window = int(state.get("window", 0))
                if dedup is not None:
                    self.dedup.load_state_dict(dedup)
                if (path / PENDING).is_file():
                    with pa.OSFile(str(path / PENDING), "rb") as f:
                        self.buffer = pa.ipc.open_file(f).read_all()
                return path
            init_from = path  # a batch-phase checkpoint in the student's own directory: start from it
        if init_from is None:
            return None
        self.t.load_checkpoint(Path(init_from), digest=None)
        self.t.counts = SignalCounts()  # the summary's signal counts are the streaming phase's own
        return Path(init_from)

    # ---- one poll ------------------------------------------------------------------------------------------------
    def poll_once(self, timeout: float = 0.0) -> int:
        """Poll once, train every full batch now buffered, checkpoint and commit when due; returns rows polled."""
        table, cursor = poll_new_rows(self.stream, self.poll_rows, timeout, self.dedup, self.counts, self.uncommitted,
                                      validate=self._valid)
        if cursor.empty:
            return 0
        if table is not None:
            table = self._in_view(table)
            if table.num_rows:
                # permissive: producers may differ in a column's exact type (fixed or variable list of logits)
                self.buffer = table if self.buffer is None else pa.concat_tables([self.buffer, table],
                                                                                 promote_options="permissive")
        while self.buffer is not None and self.buffer.num_rows >= self.bs:
            rows, self.buffer = self.buffer.slice(0, self.bs), self.buffer.slice(self.bs)
            self._train(rows)
        self._maybe_checkpoint(force=False)
        return cursor.rows

    def run(self, timeout: float = 0.0, max_polls: int | None = None) -> dict:
        """Poll until a poll brings nothing (or `max_polls`); returns the summary so far."""
        polls = 0
        while (max_polls is None or polls < max_polls) and self.poll_once(timeout):
            polls += 1
        return self.summary()

    def finish(self) -> dict:
        """Train the buffered rows short of a batch (a day's last batch), then checkpoint and commit."""
        if self.buffer is not None and self.buffer.num_rows:
            rows, self.buffer = self.buffer, None
            self._train(rows)
        self._maybe_checkpoint(force=True)
        return self.summary()

    def _valid(self, table: pa.Table) -> pa.Table:
        """The rows `self.check` passes; the others are dead-lettered on the joined stream, logged and counted."""
        table, bad = split_malformed(table, self.check, self.stream, f"student {self.t.name}")
        self.counts.dead_lettered += bad
        return table

    def _in_view(self, table: pa.Table) -> pa.Table:
        view, nt = self.t.view, self.t.num_traffic
        keep = keep_mask(column_np(table, "sample_id"), column_np(table, f"label_{view.task}") > 0.5,
                         column_np(table, "traffic"), view, nt)
        self.counts.outside_view += int((~keep).sum())
        return table if keep.all() else table.filter(pa.array(keep))

    def _train(self, rows: pa.Table) -> None:
        ids = column_np(rows, "sample_id")
        batch = self.t.source.read_ids(ids, view=self.t.view)
        batch.labels = {t: torch.from_numpy(column_np(rows, f"label_{t}").astype(np.float32)) if f"label_{t}" in
                        rows.column_names else v for t, v in batch.labels.items()}
        has = column_np(rows, "has_signal").astype(bool)
        c = self.counts
        c.trained += len(ids)
        c.with_signal += int(has.sum())
        c.label_only += int((~has).sum())
        logits = found = None
        if self.distill:
            logits, found = self._signals(rows, has)
            t_counts = self.t.counts
            t_counts.looked_up += len(ids)
            t_counts.missing += int((~has).sum())
            finite = torch.isfinite(logits[:, list(self.t.distill_cols.values())]).all(1)
            t_counts.rejected_non_finite += int((found & ~finite).sum())
            self._materialise(ids, logits, has, rows)
            _, mask = self.t.gate(batch, logits, found)
            logits = torch.nan_to_num(logits)  # masked rows get no loss; keep NaN out of the arithmetic
            self.t.train_step(batch, logits, mask)
        else:
            self.t.train_step(batch)

    def _materialise(self, ids: np.ndarray, logits: torch.Tensor, has: np.ndarray, rows: pa.Table) -> None:
        """Write the rows' signals as consumed (raw, NaN included: readers reject them as the student did) into the
        open window of the materialised store."""
        if self.writer is None or not has.any():
            return
        if self.writer.window != self.window:
            self.writer.begin_window(self.window)
        step = int(np.nanmax(column_np(rows.filter(pa.array(has)), "teacher_step")))
        self.writer.write(torch.from_numpy(ids[has]), logits[torch.from_numpy(has)], step)

    def _signals(self, rows: pa.Table, has: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw teacher logits [B, T] (NaN where no signal) and the found mask [B]."""
        num = len(self.tasks)
        col = rows.column("logits").combine_chunks()
        col = col.fill_null(pa.scalar([float("nan")] * num, col.type))
        logits = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, num)
        return torch.from_numpy(logits), torch.from_numpy(has)

    # ---- checkpoint and commit -------------------------------------------------------------------------------------
    def _maybe_checkpoint(self, force: bool) -> None:
        s = self.t.s
        if not s.checkpoint_dir:
            for cur in self.uncommitted:  # nothing to resume from: commit as soon as the rows are trained
                self.stream.commit(cur)
            self.uncommitted.clear()
            if force and self.writer is not None and self.writer.window == self.window:
                self.writer.commit_window()
                self.writer.flush()
                self.window += 1
            return
        if force:
            if not self.uncommitted and self.t.steps == self.saved_step:
                return
        elif self.t.steps - self.saved_step < s.checkpoint_every:
            return
        if self.writer is not None:
            # Committed before the checkpoint: a restart from the previous checkpoint retrains the same rows and
            # writes this window again, which the writer drops as committed (never twice, never lost).
            if self.writer.window == self.window:
                self.writer.commit_window()
                self.writer.flush()
            self.window += 1
        files = {PENDING: _ipc(self.buffer)} if self.buffer is not None and self.buffer.num_rows else None
        self.t.save_checkpoint(dedup=self.dedup.state_dict(), files=files, phase="stream", window=self.window,
                               stream=self.stream.state_after(self.uncommitted), stream_counts=asdict(self.counts))
        self.saved_step = self.t.steps
        for cur in self.uncommitted:  # only now: the checkpoint holds every step these rows went into
            self.stream.commit(cur)
        self.uncommitted.clear()

    def close(self) -> None:
        """Stop the materialising writer (its open window is left uncommitted: the next checkpoint's rows)."""
        if self.writer is not None:
            self.writer.close(commit=False)
            self.writer = None

    def summary(self) -> dict:
        """Stream and signal counters, steps and samples."""
        return {"train/steps": self.t.steps, "train/samples": self.t.samples,
                **{f"stream/{k}": v for k, v in asdict(self.counts).items()},
                "stream/dead_lettered_by_backend": self.stream.dead_rows,
                **{f"signals/{k}": v for k, v in asdict(self.t.counts).items()}}
