"""The streaming teacher: resumes from its batch-phase checkpoint and trains one pass over the sample stream,
writing every forward's raw logits to the signal store (the same windows, continued) and to the signal stream.

    trainer = TeacherTrainer(cfg, init_distributed())       # as many ranks as the batch teacher had
    teacher = StreamingTeacher(trainer, samples, signals)   # rank 0: the streams; other ranks: None, None
    rank 0: teacher.run(); teacher.finish(); ...; teacher.close()     other ranks: teacher.follow(); trainer.close()

Ranks. The checkpoint is resumed by the world size that wrote it, so the streaming teacher runs on the batch
teacher's ranks. Rank 0 is the only stream client: it polls the sample stream, validates and de-duplicates the rows,
and broadcasts the new rows as polled (keys, day, traffic, labels: tens of bytes each) to the other ranks, which
wait in :meth:`follow` for rank 0's commands (rows, finish, evaluate, stop). Every rank then holds the same buffer of
rows and cuts it the same way: a global batch is `world x data.batch_size` rows, rank r trains rows [r*B, (r+1)*B) of
it, rebuilding the features by id (recdistill/train/stream_student.py does the same), so the ranks step in lockstep
(DMP's forward is collective) with no further agreement. The day's last, short global batch gives some ranks a short
slice, padded, or none (a filler row with 0 valid rows), as recdistill/train/lockstep.py does in the batch phase.
Each rank writes its logits to its own shard of the signal store; for the signal stream they are gathered on rank 0,
which appends them (one producer, in step order). Collectives run on a gloo group of their own with a long timeout:
the other ranks wait there while rank 0 runs the joiner and the students.

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
from datetime import timedelta

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from recdistill.streams.base import Cursor, DuplicateFilter, Stream, column_np, poll_new_rows
from recdistill.streams.records import signal_records
from recdistill.streams.validate import RecordCheck, split_malformed
from recdistill.train.lockstep import pad_rows
from recdistill.train.teacher import TeacherTrainer, build_writer

#: How long the other ranks wait for rank 0's next command (rank 0 trains every student of a streaming day
#: in between); gloo's default of 30 minutes would end a long day.
COMMAND_TIMEOUT = timedelta(hours=24)


@dataclass
class TeacherStreamCounts:
    """Rows of the sample stream as the teacher saw them, and signal rows it published (all ranks together)."""

    polled: int = 0
    redelivered: int = 0
    dead_lettered: int = 0  # malformed sample rows put aside (recdistill/streams/validate.py)
    trained: int = 0
    published: int = 0


class StreamingTeacher:
    """Trains `trainer` on the sample stream and publishes its logits (see module docstring). Rank 0 passes the
    `samples` and `signals` streams; the other ranks pass None and call :meth:`follow`."""

    def __init__(self, trainer: TeacherTrainer, samples: Stream | None, signals: Stream | None, *,
                 store_uri: str | None = None, dedup_horizon_ms: int = 86_400_000) -> None:
        if not hasattr(trainer.source, "read_ids"):
            raise TypeError(f"data.source={trainer.cfg.data.source} cannot rebuild samples by id (no read_ids)")
        self.rank, self.world = trainer.info.rank, trainer.info.world_size
        if self.rank == 0 and (samples is None or signals is None):
            raise ValueError("the streaming teacher's rank 0 needs the sample and the signal stream")
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
        # Collective on every rank, in the same order: rank 0's commands and the logits' gather.
        self.group = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT) if self.world > 1 else None
        self.resumed_step = trainer.maybe_resume()
        if store_uri is not None and trainer.writer is not None:
            # The batch store was needed to resume (the checkpoint vouches for its windows); the streaming phase's
            # rows go to a store of their own, so the batch run's store stays as it was and the phase can rerun.
            trainer.writer.close()
            trainer.writer = build_writer(trainer.cfg, self.rank, trainer.tasks, store_uri)
        if trainer.hidden_writer is not None:
            # teacher.signal_hidden is a batch-phase signal (the signal stream carries logits only): the batch
            # store keeps what the batch phase committed, and the stream's steps write no representations
            trainer.hidden_writer.close()
            trainer.hidden_writer = None
        ws = trainer.cfg.signals.window_steps
        # The batch phase committed its last, partial window: the stream's rows start a window of their own (a
        # committed window takes no more rows), so the step count moves on to the next window boundary.
        trainer.steps = -(-trainer.steps // ws) * ws
        self.seq = 0  # the signal producer's sequence (rank 0)
        self.pending: list[tuple[int, np.ndarray, np.ndarray]] = []  # this rank's (step, ids, logits) to publish
        trainer.signal_sinks.append(self._collect)

    # ---- rank 0 drives, the other ranks follow ------------------------------------------------------------------
    def _command(self, op: str, payload=None) -> None:  # noqa: ANN001 - any picklable
        """Rank 0: tell the other ranks what to do next (they are waiting in :meth:`follow`)."""
        if self.world > 1:
            dist.broadcast_object_list([op, payload], src=0, group=self.group)

    def follow(self) -> None:
        """Ranks > 0: carry out rank 0's commands until it says stop."""
        while True:
            msg = [None, None]
            dist.broadcast_object_list(msg, src=0, group=self.group)
            op, payload = msg
            if op == "rows":
                self._consume(payload)
            elif op == "finish":
                self._finish_local()
            elif op == "eval":
                self.t.evaluator.evaluate(self.t.dmp, payload)
            elif op == "stop":
                return
            else:
                raise RuntimeError(f"streaming teacher rank {self.rank}: unknown command {op!r} from rank 0")

    def close(self) -> None:
        """Rank 0: release the other ranks from :meth:`follow`, then close this rank's trainer."""
        if self.rank == 0:
            self._command("stop")
        self.t.close()

    # ---- signals -------------------------------------------------------------------------------------------------
    def _collect(self, ids: torch.Tensor, logits: torch.Tensor, step: int) -> None:
        self.pending.append((step, ids.cpu().numpy(), logits.cpu().numpy()))

    def _publish_pending(self) -> None:
        """Collective: every rank's logits since the last call go to rank 0, which appends them to the signal
        stream in step order (rank order within a step) as one append."""
        mine, self.pending = self.pending, []
        if self.world > 1:
            parts: list | None = [None] * self.world if self.rank == 0 else None
            dist.gather_object(mine, parts, dst=0, group=self.group)
            if self.rank != 0:
                return
            mine = sorted((e for part in parts for e in part), key=lambda e: e[0])  # stable: rank order kept
        recs = []
        for step, ids, z in mine:
            recs.append(signal_records(ids, z, step=step, version=self.version, rows_per_day=self.rows_per_day,
                                       seq0=self.seq))
            self.seq += len(ids)
        if recs:
            table = pa.concat_tables(recs)
            self.signals.append(table)
            self.counts.published += table.num_rows

    # ---- the loop ------------------------------------------------------------------------------------------------
    def poll_once(self, timeout: float = 0.0) -> int:
        """Rank 0: poll the sample stream once and train every full global batch buffered (every rank); returns
        rows polled."""
        table, cursor = poll_new_rows(self.samples, 16 * self.bs * self.world, timeout, self.dedup, self.counts,
                                      self.uncommitted, validate=self._valid)
        if cursor.empty:
            return 0
        if table is not None:
            self._command("rows", table)
            self._consume(table)
        return cursor.rows

    def _consume(self, table: pa.Table) -> None:
        """Every rank: buffer the new rows, train each full global batch, publish the logits."""
        self.buffer = table if self.buffer is None else pa.concat_tables([self.buffer, table],
                                                                         promote_options="permissive")
        size = self.bs * self.world
        while self.buffer is not None and self.buffer.num_rows >= size:
            rows, self.buffer = self.buffer.slice(0, size), self.buffer.slice(size)
            self._train(rows)
        self._publish_pending()

    def run(self, timeout: float = 0.0) -> dict:
        """Rank 0: poll until a poll brings nothing; returns the counts."""
        while self.poll_once(timeout):
            pass
        return self.summary()

    def finish(self) -> dict:
        """Rank 0 (every rank follows): train the short last global batch, commit the open signal window, flush the
        store, commit the sample cursor."""
        self._command("finish")
        self._finish_local()
        for cur in self.uncommitted:
            self.samples.commit(cur)
        self.uncommitted.clear()
        return self.summary()

    def _finish_local(self) -> None:
        if self.buffer is not None and self.buffer.num_rows:
            rows, self.buffer = self.buffer, None
            self._train(rows)
        self._publish_pending()
        if self.t.writer is not None:
            self.t.writer.commit_window()
            self.t.writer.flush()

    def _valid(self, table: pa.Table) -> pa.Table:
        table, bad = split_malformed(table, self.check, self.samples, "streaming teacher")
        self.counts.dead_lettered += bad
        return table

    def _train(self, rows: pa.Table) -> None:
        """Every rank: one step on this rank's slice of the global batch `rows` (see module docstring)."""
        t = self.t
        mine = rows.slice(self.rank * self.bs, self.bs)
        valid = mine.num_rows
        src = mine if valid else rows.slice(0, 1)  # a rank with no rows forwards a filler: 0 valid rows
        batch = t.source.read_ids(column_np(src, "sample_id"), view=t.cfg.sampling.teacher)
        batch.labels = {k: torch.from_numpy(column_np(src, f"label_{k}").astype(np.float32))
                        if f"label_{k}" in src.column_names else v for k, v in batch.labels.items()}
        if self.world > 1:
            batch = pad_rows(batch, self.bs)  # equal local batch sizes: DMP's collectives need them on gloo
        t.train_step(batch, valid)
        t.trained += valid
        t.steps += 1
        self.counts.trained += rows.num_rows  # the global batch's rows: every rank counts them all
        if t.steps % t.cfg.signals.window_steps == 0 and t.writer is not None:
            t.writer.commit_window()

    @torch.no_grad()
    def evaluate(self, days: list[int]) -> dict[str, float]:
        """Rank 0 (every rank follows): the teacher's next-day metrics on the unsampled `days` (`auc/<task>`, ...)."""
        self._command("eval", list(days))
        return self.t.evaluator.evaluate(self.t.dmp, days)

    def summary(self) -> dict:
        """Counts, steps and samples."""
        return {"teacher/steps": self.t.steps, **{f"teacher/stream/{k}": v for k, v in asdict(self.counts).items()}}
