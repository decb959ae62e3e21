"""The streaming teacher: resumes from its batch-phase checkpoint and trains one pass over the sample stream,
writing every forward's raw logits to the signal store (the same windows, continued) and to the signal stream.

    trainer = TeacherTrainer(cfg, init_distributed())       # world size 1 (see below)
    teacher = StreamingTeacher(trainer, open_stream(cfg.stream, "samples"), open_stream(cfg.stream, "signals"))
    teacher.run(); teacher.finish()                          # one poll loop, then the short last batch

First version: one process (world size 1, which TeacherTrainer supports); the batch teacher must have run on one
rank too (`experiment.teacher_procs: 1`), as a checkpoint is resumed only by the world size that wrote it. A
multi-rank streaming teacher would give each rank the stream partitions p with p % world == rank and keep the ranks
in lockstep as the batch phase does (recdistill/train/lockstep.py). The teacher rebuilds features by id as the
streaming student does (recdistill/train/stream_student.py); its sample stream carries its own sampled view.

The logits also go to a signal store of their own (`store_uri`, `<run>/stream/signals` in `recdistill stream`),
its windows numbered on from the batch phase's. Forward distillation holds as in the batch phase: each logit is
written by the forward of the step that first trains on the sample, before backward. Delivery: the sample-stream
cursor is committed at `finish()` (the end of a streaming day), after the signal store's window is committed and
flushed; the streaming teacher does not resume in the middle of a streaming day (a crashed one re-runs the day from
its batch checkpoint). Malformed sample rows (a null or NaN label, a traffic source the data lacks, an id the source
cannot rebuild) are dead-lettered on the sample stream, logged by id and counted, as the student does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch

from recdistill.streams.base import Cursor, DuplicateFilter, Stream, column_np, poll_new_rows
from recdistill.streams.records import signal_records
from recdistill.streams.validate import RecordCheck, split_malformed
from recdistill.train.teacher import TeacherTrainer, build_writer


@dataclass
class TeacherStreamCounts:
    """Rows of the sample stream as the teacher saw them, and signal rows it published."""

    polled: int = 0
    redelivered: int = 0
    dead_lettered: int = 0  # malformed sample rows put aside (recdistill/streams/validate.py)
    trained: int = 0
    published: int = 0


class StreamingTeacher:
    """Trains `trainer` on the sample stream and publishes its logits (see module docstring)."""

    def __init__(self, trainer: TeacherTrainer, samples: Stream, signals: Stream, *, store_uri: str | None = None,
                 dedup_horizon_ms: int = 86_400_000) -> None:
        if trainer.info.world_size != 1:
            raise RuntimeError(f"the streaming teacher runs on one process (world size {trainer.info.world_size}); "
                               "run the batch teacher with experiment.teacher_procs=1")
        if not hasattr(trainer.source, "read_ids"):
            raise TypeError(f"data.source={trainer.cfg.data.source} cannot rebuild samples by id (no read_ids)")
        self.t, self.samples, self.signals = trainer, samples, signals
        self.bs = trainer.cfg.data.batch_size
        self.version = trainer.cfg.teacher_digest()
        self.rows_per_day = trainer.cfg.data.samples_per_day
        self.dedup = DuplicateFilter(dedup_horizon_ms)
        self.counts = TeacherStreamCounts()
        self.check = RecordCheck(labels=[f"label_{t}" for t in trainer.tasks],
                                 traffic_sources=trainer.source.schema.num_traffic,
                                 known_ids=getattr(trainer.source, "known_ids", None))
        self.buffer: pa.Table | None = None
        self.uncommitted: list[Cursor] = []
        self.resumed_step = trainer.maybe_resume()
        if store_uri is not None and trainer.writer is not None:
            # The batch store was needed to resume (the checkpoint vouches for its windows); the streaming phase's
            # rows go to a store of their own, so the batch run's store stays as it was and the phase can rerun.
            trainer.writer.close()
            trainer.writer = build_writer(trainer.cfg.model_copy(update={"signals": trainer.cfg.signals.model_copy(
                update={"uri": store_uri})}), 0, trainer.tasks)
        ws = trainer.cfg.signals.window_steps
        # The batch phase committed its last, partial window: the stream's rows start a window of their own (a
        # committed window takes no more rows), so the step count moves on to the next window boundary.
        trainer.steps = -(-trainer.steps // ws) * ws
        self.seq = 0  # the signal producer's sequence
        trainer.signal_sinks.append(self._publish)

    def _publish(self, ids: torch.Tensor, logits: torch.Tensor, step: int) -> None:
        rec = signal_records(ids.cpu().numpy(), logits.cpu().numpy(), step=step, version=self.version,
                             rows_per_day=self.rows_per_day, seq0=self.seq)
        self.signals.append(rec)
        self.seq += rec.num_rows
        self.counts.published += rec.num_rows

    def poll_once(self, timeout: float = 0.0) -> int:
        """Poll the sample stream once and train every full batch buffered; returns rows polled."""
        table, cursor = poll_new_rows(self.samples, 16 * self.bs, timeout, self.dedup, self.counts, self.uncommitted,
                                      validate=self._valid)
        if cursor.empty:
            return 0
        if table is not None:
            self.buffer = table if self.buffer is None else pa.concat_tables([self.buffer, table],
                                                                             promote_options="permissive")
        while self.buffer is not None and self.buffer.num_rows >= self.bs:
            rows, self.buffer = self.buffer.slice(0, self.bs), self.buffer.slice(self.bs)
            self._train(rows)
        return cursor.rows

    def run(self, timeout: float = 0.0) -> dict:
        """Poll until a poll brings nothing; returns the counts."""
        while self.poll_once(timeout):
            pass
        return self.summary()

    def finish(self) -> dict:
        """Train the short last batch, commit the open signal window, flush the store, commit the sample cursor."""
        if self.buffer is not None and self.buffer.num_rows:
            rows, self.buffer = self.buffer, None
            self._train(rows)
        if self.t.writer is not None:
            self.t.writer.commit_window()
            self.t.writer.flush()
        for cur in self.uncommitted:
            self.samples.commit(cur)
        self.uncommitted.clear()
        return self.summary()

    def _valid(self, table: pa.Table) -> pa.Table:
        table, bad = split_malformed(table, self.check, self.samples, "streaming teacher")
        self.counts.dead_lettered += bad
        return table

    def _train(self, rows: pa.Table) -> None:
        t = self.t
        batch = t.source.read_ids(column_np(rows, "sample_id"), view=t.cfg.sampling.teacher)
        batch.labels = {k: torch.from_numpy(column_np(rows, f"label_{k}").astype(np.float32))
                        if f"label_{k}" in rows.column_names else v for k, v in batch.labels.items()}
        t.train_step(batch)
        t.trained += len(batch)
        t.steps += 1
        self.counts.trained += len(batch)
        if t.steps % t.cfg.signals.window_steps == 0 and t.writer is not None:
            t.writer.commit_window()

    @torch.no_grad()
    def evaluate(self, days: list[int]) -> dict[str, float]:
        """The teacher's next-day metrics on the unsampled `days` (`auc/<task>`, ...)."""
        return self.t.evaluator.evaluate(self.t.dmp, days)

    def summary(self) -> dict:
        """Counts, steps and samples."""
        return {"teacher/steps": self.t.steps, **{f"teacher/stream/{k}": v for k, v in asdict(self.counts).items()}}
