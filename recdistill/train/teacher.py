"""Teacher trainer: TorchRec-sharded embeddings + DeepSpeed dense, writing raw logits as it trains.

    python -m recdistill.train.teacher --config configs/teacher/tiny.yaml        # one process (1-rank gloo)
    torchrun --nproc_per_node=2 -m recdistill.train.teacher --config configs/teacher/tiny.yaml \\
        --set data.samples_per_day=1200 --set teacher.checkpoint_dir=runs/ckpt --eval-out runs/teacher_eval.npz
    torchrun --nproc_per_node=8 -m recdistill.train.teacher --config configs/demo.yaml \\
        --set teacher.deepspeed=configs/deepspeed/zero3.json --set teacher.sharding=row_wise
    deepspeed --num_gpus 2 --module recdistill.train.teacher --config configs/teacher/tiny.yaml
    launch/teacher_torchrun.sh | launch/teacher_deepspeed.sh | sbatch launch/teacher_slurm.sbatch   # wrappers

Forward distillation: each step's raw logits go to the rank's SignalWriter *before* backward, so the stored
logit is the out-of-sample prediction of the step that first trains on that sample (one pass over the training
days: no sample is trained twice). A window is committed after its last step (every `signals.window_steps`).
Every sample of the teacher's view of the training days is trained once and gets exactly one committed row.

This module is the loop; the parts are components (torchtitan keeps train.py a thin loop the same way):
  recdistill/train/lockstep.py            all ranks forward equal-size batches together while any has data (DMP's
                                          forward runs collectives); padded and filler rows train / write nothing
  recdistill/train/teacher_eval.py        next-day evaluation: the unsampled last `data.eval_days` days, gathered
                                          over ranks, true-space predictions, `eval/<metric>/<task>` in the summary
  recdistill/train/teacher_checkpoint.py  checkpoint after every `teacher.checkpoint_every` committed windows and at
                                          the end; the same command again resumes from the newest complete one
  recdistill/train/teacher_log.py         rank 0's progress bar and Tracker (metrics.jsonl + W&B, offline by
                                          default) every `teacher.log_every`; a resumed run continues its W&B run
After an error the open window is not committed. `--eval-out` keeps the eval rows.
Precision: `teacher.precision` (auto = bf16 on CUDA, fp32 on CPU) sets DeepSpeed's bf16 mode; the dense module casts
its inputs once (recdistill/models/teacher.py); bf16 is tested on CPU ranks (tests/train/test_teacher_scale.py),
NCCL + bf16 on GPUs has not been run yet (issue 15).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from recdistill.config import ROOT, Config, add_config_arguments, config_from_args
from recdistill.data.counts import CountedSource
from recdistill.data.loader import BatchLoader
from recdistill.data.roles import roles_for
from recdistill.data.source import DataSource, build_source, phase_days
from recdistill.distill.losses import task_loss
from recdistill.distill.metrics import StreamingMetrics
from recdistill.models.dense import FIT_ROWS
from recdistill.runtime import prepare_process
from recdistill.signals.schema import SignalMeta, hidden_names, hidden_uri
from recdistill.signals.writer import SignalWriter
from recdistill.tracking import console
from recdistill.train.distributed import DistInfo, destroy_distributed, init_distributed
from recdistill.train.lockstep import LockstepBatches
from recdistill.train.parallelize import build_teacher, dense_adam, parallelize_teacher
from recdistill.train.teacher_checkpoint import TeacherCheckpoints
from recdistill.train.teacher_eval import TeacherEvaluator
from recdistill.train.teacher_log import TrainLog


def deepspeed_config(cfg: Config, path: str, device: torch.device | None = None) -> dict:
    """The DeepSpeed JSON with what the run decides filled in: micro batch, clipping (explicit), and bf16 from
    `teacher.precision` (auto resolved by `device`: bf16 on a CUDA device, fp32 otherwise; default: whether CUDA
    is available). The file's own bf16 / fp16 sections are replaced: precision is the config's to say."""
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (ROOT / p).is_file():
        p = ROOT / p  # the shipped configs/deepspeed/*.json, when run from another directory
    if not p.is_file():
        raise FileNotFoundError(f"teacher.deepspeed: no such DeepSpeed config file: {p} (relative paths are looked "
                                f"up from the working directory, then from {ROOT})")
    ds = json.loads(p.read_text())
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["gradient_clipping"] = cfg.teacher.grad_clip
    ds.setdefault("zero_allow_untested_optimizer", True)  # a client torch optimizer under ZeRO
    cuda = device.type == "cuda" if device is not None else None
    ds["bf16"] = {"enabled": cfg.teacher.compute_dtype(cuda) == torch.bfloat16}
    ds.pop("fp16", None)  # fp16 (loss scaling) is not a teacher.precision; bf16 needs none
    return ds


def stacked_logits(out: dict[str, torch.Tensor], tasks: list[str]) -> torch.Tensor:
    """[B, num_tasks] raw logits in task order (what the signal store records)."""
    return torch.stack([out[t].detach().float() for t in tasks], dim=1)


def build_writer(cfg: Config, rank: int, tasks: list[str], uri: str | None = None) -> SignalWriter | None:
    """This rank's signal writer of columns `tasks` into the store at `uri` (default signals.uri); None when
    teacher.write_signals is off. The teacher version is the config digest, so a student can refuse signals of
    another teacher."""
    if not cfg.teacher.write_signals:
        return None
    meta = SignalMeta(run_id=cfg.experiment.name, teacher_version=cfg.teacher_digest(), tasks=tasks,
                      sampling=cfg.sampling.teacher)
    return SignalWriter(uri or cfg.signals.uri, rank, meta, queue_size=cfg.signals.queue_size)


def build_hidden_writer(cfg: Config, rank: int) -> SignalWriter | None:
    """This rank's writer of the teacher's representations (teacher.signal_hidden > 0): a store of the same layout
    at `hidden_uri(signals.uri)`, its columns the dimensions."""
    k = cfg.teacher.signal_hidden
    return build_writer(cfg, rank, hidden_names(k), hidden_uri(cfg.signals.uri)) if k else None


class HiddenTap:
    """Catches the teacher's last representation (the input of its task heads, [B, d_model]) on every forward,
    through a forward pre-hook on the first head: the model's code and outputs stay as they are. `take()` returns
    it in float32, projected to `dim` columns: unchanged when dim == d_model, else through a fixed Gaussian
    matrix scaled by 1/sqrt(dim), the same on every rank and every run of a seed (a random projection keeps the
    geometry a student's linear hint head is fitted to, at a fraction of the bytes per sample)."""

    def __init__(self, dense: torch.nn.Module, dim: int, seed: int) -> None:
        head = next(iter(dense.heads.values()))
        d_model = head.in_features
        self.proj = None
        if dim != d_model:
            g = torch.Generator().manual_seed(seed)
            self.proj = torch.randn(d_model, dim, generator=g) / dim ** 0.5
        self.last: torch.Tensor | None = None
        self.handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, _module: torch.nn.Module, args: tuple) -> None:
        self.last = args[0].detach()

    def take(self, rows: int | None = None) -> torch.Tensor:
        """The last forward's first `rows` rows (all by default), float32, projected."""
        h = self.last[:rows].float()
        if self.proj is not None:
            if self.proj.device != h.device:
                self.proj = self.proj.to(h.device)
            h = h @ self.proj
        return h


#: Rows per read while fitting the dense bins: a read makes the rows' histories too (20K events each at scale).
FIT_READ_ROWS = 1024


def dense_fit_rows(source: DataSource, days: list[int], rows: int = FIT_ROWS) -> torch.Tensor:
    """[~rows, Fd] dense features of the first rows of every training day (stored rows, no labels): the same on
    every rank, so every rank fits the same bin edges. Every day, not the first only: a column can depend on the day
    (counting features are all 0 on the first)."""
    per = -(-rows // max(len(days), 1))
    parts = []
    for d in days:
        n = min(per, source.num_rows(d))
        parts += [source.read(d, s, min(s + FIT_READ_ROWS, n)).dense for s in range(0, n, FIT_READ_ROWS)]
    return torch.cat(parts)


def build_feed(cfg: Config, source: DataSource, days: list[int], info: DistInfo,
               group: dist.ProcessGroup) -> LockstepBatches:
    """This rank's training batches over `days` (the teacher's sampled view), padded and in lockstep."""
    loader = BatchLoader(source, days, cfg.data.batch_size, view=cfg.sampling.teacher, rank=info.rank,
                         world_size=info.world_size, prefetch=cfg.data.prefetch, workers=cfg.data.workers,
                         device=info.device,  # CUDA: pinned batches, copied on a side stream one step ahead
                         drop_last=False)  # each day's last partial batch is padded, not dropped
    return LockstepBatches(loader, cfg.data.batch_size, group, fallback=lambda: source.read(days[0], 0, 1))


class TeacherTrainer:
    """One rank's teacher training: `run()` trains one pass over the training days; `close()` always."""

    def __init__(self, cfg: Config, info: DistInfo, run_dir: str | Path | None = None) -> None:
        from torchrec.optim import RowWiseAdagrad

        self.cfg, self.info = cfg, info
        self.source = build_source(cfg.data)
        self.tasks = self.source.schema.task_names
        self.kinds = {t.name: t.kind for t in self.source.schema.tasks}
        roles = roles_for(cfg.data.roles, self.source, "teacher", info.rank)  # reports missing roles once, at start
        if info.rank == 0 and isinstance(self.source, CountedSource):  # data.counts: which columns, once
            print(self.source.describe(), file=sys.stderr, flush=True)
        self.train_days, self.eval_days, _ = phase_days(self.source.days(), cfg.data.eval_days, cfg.stream.days)
        torch.manual_seed(cfg.experiment.seed)  # same initial weights on every rank
        ds_config = deepspeed_config(cfg, cfg.teacher.deepspeed, info.device)
        model = build_teacher(self.source.schema, cfg.teacher, roles, ds_config)  # no full copy per rank
        if cfg.teacher.dense == "bins":
            model.fit_dense(dense_fit_rows(self.source, self.train_days))
        self.dmp, self.engine = parallelize_teacher(
            model, sharding=cfg.teacher.sharding, device=info.device, ds_config=ds_config,
            local_size=info.local_world_size, dense_optimizer=dense_adam(ds_config, cfg.teacher.lr),
            pins=cfg.teacher.sharding_pins, mem_gib=cfg.teacher.sharding_mem_gib,
            sparse_optimizer=RowWiseAdagrad, sparse_kwargs={"lr": cfg.teacher.sparse_lr})
        self.control = dist.new_group(backend="gloo")  # CPU-side agreement on step counts, also under NCCL
        self.writer = build_writer(cfg, info.rank, self.tasks)
        self.hidden_writer = build_hidden_writer(cfg, info.rank)
        self.tap = HiddenTap(self.engine.module, cfg.teacher.signal_hidden, cfg.experiment.seed + 7919) \
            if self.hidden_writer is not None else None
        self.feed = build_feed(cfg, self.source, self.train_days, info, self.control)
        self.evaluator = TeacherEvaluator(cfg, self.source, info, self.control)
        self.checkpoints = TeacherCheckpoints(cfg, info.rank, self.control)
        self.log = TrainLog(cfg, info, run_dir)
        self.metrics = StreamingMetrics(self.kinds, window=20_000)
        self.trained = 0  # valid (real) rows trained by this rank
        self.steps = 0  # global steps: every rank takes each one, with or without data
        self.resumed_from: int | None = None
        #: called as sink(sample_id, raw logits [n, T], step) with each step's valid rows, after the signal writer
        #: (the streaming teacher publishes them on the signal stream)
        self.signal_sinks: list = []
        self.rows_before = 0  # rows committed by this rank before a resume (the checkpoint vouches for them)

    def valid_loss(self, out: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], valid: int) -> torch.Tensor:
        """Task loss over the first `valid` rows only (padded / filler rows get exactly zero gradient).

        Each rank's loss is the mean over its valid rows; DeepSpeed then averages dense gradients over ranks and
        TorchRec divides the summed embedding gradients by the world size (tests/train/test_parallel_teacher.py).
        With full batches everywhere that is the gradient of the global-batch mean, as before. On a step where a
        rank has no data (valid=0: zero loss, zero gradients) the average still divides by the world size, so the
        step's gradient is the mean gradient of the ranks with data scaled by (ranks with data) / world; and a
        padded last batch of a day weighs its rows 1/valid instead of 1/batch_size. Both happen on a few steps
        (one partial batch per rank and day, filler steps only at the end of the pass), Adam's and RowWiseAdagrad's
        normalisation absorb most of the scale, and the alternative (dropping those samples) loses them: accepted.
        """
        if valid == 0:
            # Zero that keeps the graph: backward still runs DMP's and DeepSpeed's collectives on this rank.
            return sum(v.sum() for v in out.values()) * 0.0
        out = {t: v[:valid] for t, v in out.items()}
        labels = {t: v[:valid] for t, v in labels.items()}
        return task_loss(out, labels, self.kinds, continuous="log_mse")  # heads predict log1p(value)

    def train_step(self, batch, valid: int | None = None) -> torch.Tensor:  # noqa: ANN001 - Batch
        """Forward, write the valid rows' signals (before backward: the out-of-sample logit), backward, step.
        `valid`: rows [0, valid) are real samples (default all); the rest are padding and train / write nothing."""
        valid = len(batch) if valid is None else valid
        batch = batch.to(self.info.device)
        out = self.dmp(batch)
        window = self.steps // self.cfg.signals.window_steps
        for w in self.writers():
            if w.window != window:
                w.begin_window(window)  # also with no valid rows: every rank commits every window
        if valid and (self.writer is not None or self.signal_sinks):  # never a padded row: it would duplicate an id
            ids, z = batch.sample_id[:valid], stacked_logits(out, self.tasks)[:valid]
            if self.writer is not None:
                self.writer.write(ids, z, self.steps)
            if self.hidden_writer is not None:
                self.hidden_writer.write(ids, self.tap.take(valid), self.steps)
            for sink in self.signal_sinks:
                sink(ids, z, self.steps)
        loss = self.valid_loss(out, batch.labels, valid)
        self.engine.backward(loss)
        self.engine.step()
        if valid:
            probs = {t: torch.sigmoid(v[:valid]) if self.kinds[t] == "binary" else torch.expm1(v[:valid])
                     for t, v in out.items()}
            self.metrics.update({t: v[:valid] for t, v in batch.labels.items()},
                                {t: v.detach() for t, v in probs.items()})
        return loss.detach()

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def writers(self) -> list[SignalWriter]:
        """The open signal writers, the representations' first. Each writes its commit markers on its own
        background thread, so at a crash one store may hold a window the other lacks; a checkpoint flushes every
        writer, a resume checks every store for the windows it vouches for, and rewrites whatever either store
        lacks of the windows after it. A student gives a hint only to rows that also have a usable logit."""
        return [w for w in (self.hidden_writer, self.writer) if w is not None]

    def window_done(self) -> None:
        """After the last step of a window: commit it and, every `checkpoint_every` windows, checkpoint."""
        for w in self.writers():
            w.commit_window()
        if self.checkpoints.due(self.steps // self.cfg.signals.window_steps):
            self.checkpoint()

    def checkpoint(self) -> Path:
        """Collective: save a checkpoint (recdistill/train/teacher_checkpoint.py). Called only right after a
        commit, so a restart from it replays no committed row and loses none."""
        position = {"trained": self.trained, **self.feed.state()}
        return self.checkpoints.save(self.steps, position, dmp=self.dmp, engine=self.engine, writers=self.writers(),
                                     tracking=self.log.tracking_state())

    def maybe_resume(self) -> int:
        """Load the newest complete checkpoint when teacher.resume and there is one; returns the steps done. Moves
        this rank's feed to its data position and the log onto the checkpointed run's tracking."""
        got = self.checkpoints.resume(dmp=self.dmp, engine=self.engine, writers=self.writers())
        if got is None:
            return 0
        self.steps, self.trained = got.steps, got.trained
        if got.data is not None:
            self.feed.seek(got.data)  # O(1): the loader restarts at the saved position
        else:  # a checkpoint from before positions were saved: replay the deterministic loader, as then
            console(f"teacher: {got.path} holds no loader position (an older checkpoint): replaying {got.batches} "
                    "batches to reach it", self.info.rank)
            self.feed.skip(got.batches, got.exhausted)
        self.log.resume(got.tracking)
        self.resumed_from = self.steps
        self.rows_before = self.trained  # a checkpoint follows a commit: each sample trained so far has its row
        console(f"teacher: resumed from {got.path} (step {self.steps}, rank {self.info.rank} at batch "
                f"{got.batches}{', exhausted' if got.exhausted else ''})", self.info.rank)
        return self.steps

    # ---- the loop ----------------------------------------------------------------------------------------------
    def run(self, eval_out: str | None = None) -> dict:
        """One pass over the training days (or teacher.steps steps), resuming from a checkpoint if configured,
        then the next-day evaluation; returns the summary (`eval/<metric>/<task>` keys from the evaluator)."""
        start = self.maybe_resume()
        trained0, t0 = self.trained, time.perf_counter()
        self.log.start(self.steps, self.trained)
        last_loss = torch.tensor(float("nan"))  # of this rank's last step with data (a filler step's is 0)
        while self.cfg.teacher.steps is None or self.steps < self.cfg.teacher.steps:
            nxt = self.feed.next()
            if nxt is None:
                break
            batch, valid = nxt
            loss = self.train_step(batch, valid)
            if valid:
                last_loss = loss
            self.trained += valid
            self.steps += 1
            if self.steps % self.cfg.signals.window_steps == 0:
                self.window_done()
            self.log.step(self, last_loss)
        for w in self.writers():
            w.commit_window()  # the last, partial window
            w.flush()  # its rows are on the store before the summary counts rows_written
        if self.checkpoints.enabled and self.steps > start and self.checkpoints.saved_step != self.steps:
            self.checkpoint()  # a finished run resumes as finished: nothing replayed
        secs = time.perf_counter() - t0
        self.log.close()
        summary = self.summary(secs, (self.trained - trained0) / max(secs, 1e-9), last_loss)
        metrics = self.evaluator.evaluate(self.dmp, self.eval_days, out_path=eval_out)
        return {**summary, **{f"eval/{k}": v for k, v in metrics.items()}}

    def summary(self, secs: float, samples_per_s: float, loss: torch.Tensor) -> dict:
        """This rank's training summary: steps, samples, data position, signal counters, streaming metrics."""
        stats = self.writer.stats if self.writer is not None else None
        return {"rank": self.info.rank, "local_world_size": self.info.local_world_size, "steps": self.steps,
                "trained_samples": self.trained,
                "batches": self.feed.taken, "resumed_from_step": self.resumed_from, "seconds": secs,
                "samples_per_s": samples_per_s, "loss": float(loss),
                "signals/rows_written": stats.rows_written if stats else 0,
                "signals/rows_dropped_committed": stats.rows_dropped_committed if stats else 0,
                "signals/write_s": stats.write_s if stats else 0.0,
                **{f"stream/{k}": v for k, v in self.metrics.compute().items()}}

    def close(self, ok: bool = True) -> None:
        """Stop the writer (also after an error). `ok=False` (leaving on an error): the open window is *not*
        committed — it holds only the rows up to the failure, and a resumed run must rewrite it whole."""
        for w in self.writers():
            w.close(commit=ok)
        self.writer = self.hidden_writer = None
        if self.tap is not None:
            self.tap.handle.remove()
        self.log.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point for torchrun / the deepspeed launcher / a single process."""
    p = argparse.ArgumentParser(description="recdistill teacher trainer")
    add_config_arguments(p)
    p.add_argument("--summary", default=None, help="write each rank's summary JSON to this path + .rank{r}.json")
    p.add_argument("--eval-out", default=None, metavar="PATH",
                   help="rank 0 writes the eval days' predictions here (.npz: sample_id, pred_<task> = true-space "
                   "probability for binary tasks / value for continuous ones, label_<task>, p_true_<task>)")
    p.add_argument("--run-dir", default=None, help="tracking directory (metrics.jsonl, W&B, config.yaml); default "
                   "tracking.run_dir/<tracking.run_name or experiment.name-teacher-TIMESTAMP>, or, resuming, the "
                   "directory of the run the checkpoint was written by")
    # The deepspeed launcher appends --local_rank=N (and sets LOCAL_RANK too, which init_distributed reads).
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    prepare_process()
    info = init_distributed()
    trainer, ok = None, False
    try:
        trainer = TeacherTrainer(cfg, info, run_dir=args.run_dir)
        summary = trainer.run(eval_out=args.eval_out)
        trainer.close()
        trainer.log.summary(summary)
        console(f"teacher done: {json.dumps(summary)}", info.rank)
        if args.summary:
            Path(f"{args.summary}.rank{info.rank}.json").write_text(json.dumps(summary))
        ok = True
        return 0
    finally:
        if trainer is not None:
            trainer.close(ok=ok)
            trainer.log.finish(ok)
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
