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
DMP's forward runs collectives (row-wise: an all-gather that on gloo needs equal local batch sizes), so all ranks
step together with batches of `data.batch_size` rows: a day's last partial batch is padded by repeating its rows,
and while any rank still has data (agreed each step over a small gloo group) a rank that has run out forwards a
filler batch (a copy of its last real batch). Padded and filler rows are invalid: no loss, no signal, no metrics.

Checkpoints (recdistill/train/checkpoint.py): every `teacher.checkpoint_every` committed windows, and at the end,
into `teacher.checkpoint_dir`; running the same command again resumes from the newest complete one (skipping the
real batches each rank consumed; the writer keeps committed windows and rewrites the open one). After an error the open
window is not committed. Next-day evaluation: the unsampled last `data.eval_days` days, predictions in the true
space (the teacher's own sampling correction), `eval/<metric>/<task>` in the summary; `--eval-out` keeps the rows.
Logging: rank 0's progress bar and Tracker (metrics.jsonl + W&B, offline by default) every `teacher.log_every`.
Not yet here (issue 4): a checked GPU path; DeepSpeed's bf16 switches on with CUDA, but NCCL + bf16 were not run.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from recdistill.config import ROOT, Config, add_config_arguments, config_from_args, save_config
from recdistill.data.loader import BatchLoader
from recdistill.data.roles import roles_for
from recdistill.data.source import build_source
from recdistill.distill.debias import to_true
from recdistill.distill.losses import task_loss
from recdistill.distill.metrics import StreamingMetrics, evaluate
from recdistill.models.teacher import TeacherModel
from recdistill.signals.schema import SignalMeta
from recdistill.signals.writer import SignalWriter
from recdistill.tracking import Tracker, console, progress
from recdistill.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from recdistill.train.distributed import DistInfo, destroy_distributed, init_distributed
from recdistill.train.parallelize import parallelize_teacher


def deepspeed_config(cfg: Config, path: str) -> dict:
    """The DeepSpeed JSON with what the run decides filled in: micro batch, clipping (explicit), precision."""
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
    ds["bf16"] = {"enabled": torch.cuda.is_available()}  # fp32 on CPU
    return ds


class TrainLog:
    """Rank 0's progress bar and Tracker (W&B offline + metrics.jsonl); no-ops on other ranks. Every
    `teacher.log_every` steps: train/loss, train/auc/<task> (streaming, last 20K samples of this rank),
    throughput/samples_per_s (all ranks, since the previous point), signals/rows_written (committed, all ranks)."""

    def __init__(self, cfg: Config, info: DistInfo, run_dir: str | Path | None) -> None:
        self.cfg, self.info, self.every = cfg, info, cfg.teacher.log_every
        name = cfg.tracking.run_name or f"{cfg.experiment.name}-teacher-{time.strftime('%Y%m%d-%H%M%S')}"
        self.run_dir = Path(run_dir) if run_dir else Path(cfg.tracking.run_dir) / name
        self.tracker: Tracker | None = None
        self.bar = None

    def start(self, steps: int, trained: int) -> None:
        """Open the tracker and the bar at `steps` done (a resumed run continues its step axis)."""
        if self.tracker is None:
            if self.info.rank == 0:
                save_config(self.cfg, self.run_dir)
            self.tracker = Tracker(self.cfg.tracking, self.run_dir, self.cfg.model_dump(mode="json"),
                                   name=self.run_dir.name, rank=self.info.rank)
        self.bar = progress(total=self.cfg.teacher.steps, desc="teacher", enabled=self.cfg.tracking.progress,
                            rank=self.info.rank, unit="step")
        self.bar.update(steps)
        self._mark = (time.perf_counter(), trained)

    def step(self, trainer: TeacherTrainer, loss: torch.Tensor) -> None:
        """After each step: advance the bar; every `log_every` steps one point (a small gloo all-reduce on every
        rank, so all ranks call this at the same steps)."""
        self.bar.update(1)
        if trainer.steps % self.every:
            return
        # Rows committed in the store by every rank: this process's, plus those the resumed checkpoint vouches for.
        rows = torch.tensor([trainer.writer.stats.rows_written + trainer.rows_before if trainer.writer else 0])
        dist.all_reduce(rows, group=trainer.control)
        now = time.perf_counter()
        t0, n0 = self._mark
        self._mark = (now, trainer.trained)
        if self.info.rank != 0:
            return
        point = {"train/loss": float(loss),  # the one host sync of a log step
                 "throughput/samples_per_s": (trainer.trained - n0) * self.info.world_size / max(now - t0, 1e-9),
                 "signals/rows_written": int(rows.item()),
                 **{f"train/{k}": v for k, v in trainer.metrics.compute().items() if k.startswith("auc/")}}
        self.tracker.log(point, step=trainer.steps)
        self.bar.set_postfix(loss=f"{point['train/loss']:.4f}", refresh=False)
        console(f"teacher step {trainer.steps}: " + " ".join(f"{k} {v:.4g}" for k, v in point.items()), 0)

    def summary(self, values: dict) -> None:
        """Final values into the tracker (the run summary)."""
        if self.tracker is not None:
            self.tracker.summary(values)

    def close(self) -> None:
        """Close the bar (the tracker stays open for the summary)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finish(self, ok: bool) -> None:
        """Close everything (idempotent)."""
        self.close()
        if self.tracker is not None:
            self.tracker.finish(exit_code=0 if ok else 1)
            self.tracker = None


def pad_rows(batch, size: int):  # noqa: ANN001, ANN201 - Batch
    """`batch` with its rows repeated up to `size` rows, the real ones first (so `[:len(batch)]` are the real)."""
    return batch if len(batch) == size else batch.select(torch.arange(size) % len(batch))


def stacked_logits(out: dict[str, torch.Tensor], tasks: list[str]) -> torch.Tensor:
    """[B, num_tasks] raw logits in task order (what the signal store records)."""
    return torch.stack([out[t].detach().float() for t in tasks], dim=1)


class TeacherTrainer:
    """One rank's teacher training: `run()` trains one pass over the training days; `close()` always."""

    def __init__(self, cfg: Config, info: DistInfo, run_dir: str | Path | None = None) -> None:
        from torchrec.optim import RowWiseAdagrad

        self.cfg, self.info = cfg, info
        self.source = build_source(cfg.data)
        self.tasks = self.source.schema.task_names
        self.kinds = {t.name: t.kind for t in self.source.schema.tasks}
        days = self.source.days()
        self.train_days = days[: -cfg.data.eval_days]
        self.eval_days = days[-cfg.data.eval_days:]
        torch.manual_seed(cfg.experiment.seed)  # same initial weights on every rank
        roles = roles_for(cfg.data.roles, self.source, "teacher", info.rank)  # reports missing roles once, at start
        model = TeacherModel(self.source.schema, cfg.teacher, roles)
        self.dmp, self.engine = parallelize_teacher(
            model, sharding=cfg.teacher.sharding, device=info.device,
            ds_config=deepspeed_config(cfg, cfg.teacher.deepspeed),
            dense_optimizer=lambda p: torch.optim.Adam(p, lr=cfg.teacher.lr),
            sparse_optimizer=RowWiseAdagrad, sparse_kwargs={"lr": cfg.teacher.sparse_lr})
        self.control = dist.new_group(backend="gloo")  # CPU-side agreement on step counts, also under NCCL
        self.writer = None
        if cfg.teacher.write_signals:
            meta = SignalMeta(run_id=cfg.experiment.name, teacher_version=cfg.teacher_digest(), tasks=self.tasks,
                              sampling=cfg.sampling.teacher)
            self.writer = SignalWriter(cfg.signals.uri, info.rank, meta, queue_size=cfg.signals.queue_size)
        self.metrics = StreamingMetrics(self.kinds, window=20_000)
        self.trained = 0  # valid (real) rows trained by this rank
        self.steps = 0  # global steps: every rank takes each one, with or without data
        self.batches = 0  # real batches this rank took from its loader: its data position (checkpoints)
        self.exhausted = False  # this rank's loader has run out (it forwards filler batches from then on)
        self._filler = None  # this rank's last real batch: what it forwards once exhausted
        self.resumed_from: int | None = None
        self._saved_step: int | None = None
        self.rows_before = 0
        self.log = TrainLog(cfg, info, run_dir)

    def loader(self) -> BatchLoader:
        return BatchLoader(self.source, self.train_days, self.cfg.data.batch_size, view=self.cfg.sampling.teacher,
                           rank=self.info.rank, world_size=self.info.world_size, prefetch=self.cfg.data.prefetch,
                           drop_last=False)  # each day's last partial batch is padded by _next_batch

    def _next_batch(self, it) -> tuple | None:  # noqa: ANN001 - Iterator[Batch]; returns (Batch, int) | None
        """(batch of exactly `data.batch_size` rows, number of valid rows first in it), or None once no rank has
        data. Collective (every rank calls it at every step): the ranks agree whether any still has a batch."""
        batch = None if self.exhausted else next(it, None)
        self.exhausted = batch is None
        if not self._any_has_batch(batch is not None):
            return None
        if batch is None:
            # A rank whose chunks hold no rows at all still needs a batch to forward: one row of the data.
            filler = self._filler if self._filler is not None else self.source.read(self.train_days[0], 0, 1)
            batch, valid = filler, 0
        else:
            self.batches += 1
            self._filler, valid = batch, len(batch)
        return pad_rows(batch, self.cfg.data.batch_size), valid

    def _any_has_batch(self, has: bool) -> bool:
        flag = torch.tensor([1 if has else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        return bool(flag.item())

    def true_space(self, out: dict[str, torch.Tensor], traffic: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predictions to evaluate: binary tasks as true-space probabilities (the teacher's own sampling
        correction on its raw logit, then a sigmoid), continuous tasks as values (heads predict log1p)."""
        nt = self.source.schema.num_traffic
        return {t: torch.sigmoid(to_true(z.float(), self.cfg.sampling.teacher, traffic, nt))
                if self.kinds[t] == "binary" else torch.expm1(z.float()) for t, z in out.items()}

    def _eval_batches(self, days: list[int]):  # noqa: ANN202 - Iterator[tuple[Batch, int]]
        """(batch padded to batch_size, number of real rows) until every rank's chunk of `days` is done.

        DMP's forward runs collectives (all-to-all; all-gather for row-wise), so every rank forwards the same
        number of batches of the same size: a short last batch is padded by repeating its rows, and a rank that
        is done forwards a filler batch (0 real rows) while others still have data.
        """
        bs = self.cfg.data.batch_size
        loader = BatchLoader(self.source, days, bs, view=None, rank=self.info.rank, world_size=self.info.world_size,
                             prefetch=self.cfg.data.prefetch, drop_last=False)  # unsampled: the true population
        it, filler = iter(loader), None
        while True:
            batch = next(it, None)
            if not self._any_has_batch(batch is not None):
                return
            if batch is None:
                # A rank whose chunks hold no rows at all still needs a batch to forward: one row of the data.
                filler = filler or self.source.read(days[0], 0, 1)
                batch, real = filler, 0
            else:
                filler, real = batch, len(batch)
            yield pad_rows(batch, bs), real

    @torch.no_grad()  # not inference_mode: gloo collectives fail inside it (DESIGN §5)
    def predict(self, days: list[int]) -> dict[str, np.ndarray]:
        """Every eval sample of `days` exactly once, gathered from all ranks and sorted by sample id:
        {'sample_id', 'pred/<task>', 'label/<task>', and 'p_true/<task>' where the data has ground truth}."""
        cols: dict[str, list[np.ndarray]] = {}
        for batch, real in self._eval_batches(days):
            batch = batch.to(self.info.device)
            preds = self.true_space(self.dmp(batch), batch.traffic)
            part = {"sample_id": batch.sample_id, **{f"pred/{t}": v for t, v in preds.items()},
                    **{f"label/{t}": v for t, v in batch.labels.items()},
                    **{f"p_true/{t}": v for t, v in (batch.p_true or {}).items()}}
            for k, v in part.items():
                cols.setdefault(k, []).append(v[:real].detach().cpu().numpy())
        local = {k: np.concatenate(v) for k, v in cols.items()}
        gathered: list[dict[str, np.ndarray]] = [{} for _ in range(self.info.world_size)]
        dist.all_gather_object(gathered, local, group=self.control)  # on the gloo group: host objects, any backend
        keys = [k for k in gathered[0] if all(k in g for g in gathered)]
        merged = {k: np.concatenate([g[k] for g in gathered]) for k in keys}
        order = np.argsort(merged["sample_id"], kind="stable")
        merged = {k: v[order] for k, v in merged.items()}
        if len(np.unique(merged["sample_id"])) != len(order):
            raise RuntimeError("evaluation counted a sample twice: ranks' eval chunks overlap")
        return merged

    def evaluate(self, days: list[int] | None = None, out_path: str | None = None) -> dict[str, float]:
        """Next-day evaluation on the unsampled `days` (default: the last data.eval_days): AUC / NE / calibration
        per binary task, MSE per continuous task, Bayes-optimal values where the data has p_true. The same
        numbers on every rank. `out_path`: rank 0 writes the gathered predictions there (.npz, see `main`)."""
        days = self.eval_days if days is None else days
        self.dmp.module.train(False)
        try:
            cols = self.predict(days)
        finally:
            self.dmp.module.train(True)
        if out_path is not None and self.info.rank == 0:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            # '/' would become a folder inside the zip archive: npz keys use '_' (sample_id, pred_ctr, label_ctr).
            np.savez(out_path, **{k.replace("/", "_"): v for k, v in cols.items()})
        pick = {f: {t: torch.from_numpy(cols[f"{f}/{t}"]) for t in self.tasks if f"{f}/{t}" in cols}
                for f in ("pred", "label", "p_true")}
        metrics = evaluate(pick["label"], pick["pred"], self.kinds, p_true=pick["p_true"] or None)
        return {"samples": int(len(cols["sample_id"])), **metrics}

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
        if self.writer is not None:
            window = self.steps // self.cfg.signals.window_steps
            if self.writer.window != window:
                self.writer.begin_window(window)  # also with no valid rows: every rank commits every window
            if valid:  # never a padded row: it would duplicate a sample id
                self.writer.write(batch.sample_id[:valid], stacked_logits(out, self.tasks)[:valid], self.steps)
        _test_kill_hook(self.info.rank, self.steps)
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
    def _window_done(self) -> None:
        """After the last step of a window: commit it and, every `checkpoint_every` windows, checkpoint."""
        windows = self.steps // self.cfg.signals.window_steps
        if self.writer is not None:
            self.writer.commit_window()
        if self.cfg.teacher.checkpoint_dir and windows % self.cfg.teacher.checkpoint_every == 0:
            self.checkpoint()

    def checkpoint(self) -> Path:
        """Collective: flush committed windows to the store, then save (recdistill/train/checkpoint.py). Called
        only right after a commit, so a restart from it replays no committed row and loses none."""
        if self.writer is not None:
            self.writer.flush()  # the commit markers of every sealed window are on the store before the checkpoint
        ws = self.cfg.signals.window_steps
        meta = {"digest": self.cfg.teacher_digest(), "steps": self.steps, "data_position": "per rank",
                "last_committed_window": self.steps // ws - 1 if self.steps % ws == 0 else self.steps // ws,
                "window_steps": ws, "experiment": self.cfg.experiment.name}
        self._saved_step = self.steps
        # The data position is per rank: ranks hold different numbers of real batches, so after a filler step
        # "steps done" is no longer "batches consumed" on every rank.
        mine = {"trained": self.trained, "batches": self.batches, "exhausted": self.exhausted}
        return save_checkpoint(self.cfg.teacher.checkpoint_dir, step=self.steps, dmp=self.dmp, engine=self.engine,
                               group=self.control, meta=meta, rank_state=mine,
                               keep=self.cfg.teacher.checkpoint_keep)

    def maybe_resume(self) -> int:
        """Load the newest complete checkpoint when teacher.resume and there is one; returns the steps done. Sets
        this rank's data position (`batches`, `exhausted`): :meth:`run` skips that many loader batches."""
        root = self.cfg.teacher.checkpoint_dir
        if not (root and self.cfg.teacher.resume):
            return 0
        pick = [str(latest_checkpoint(root) or "") if self.info.rank == 0 else None]
        dist.broadcast_object_list(pick, src=0, group=self.control)  # one decision, whatever each rank lists
        if not pick[0]:
            return 0
        meta, mine = load_checkpoint(pick[0], dmp=self.dmp, engine=self.engine, digest=self.cfg.teacher_digest())
        if meta["window_steps"] != self.cfg.signals.window_steps:
            raise RuntimeError(f"checkpoint {pick[0]}: window_steps {meta['window_steps']} != "
                               f"{self.cfg.signals.window_steps}")
        if "batches" not in mine:
            raise RuntimeError(f"checkpoint {pick[0]}: no per-rank data position (written by a teacher that dropped "
                               "each day's last partial batch: its position does not map onto this data order); "
                               "start afresh (teacher.resume=false or another checkpoint_dir)")
        self.steps, self.trained = int(meta["steps"]), int(mine["trained"])
        self.batches, self.exhausted = int(mine["batches"]), bool(mine["exhausted"])
        ws = self.cfg.signals.window_steps
        lost = [w for w in range(self.steps // ws) if self.writer is not None and not self.writer.is_committed(w)]
        if lost:  # the checkpoint vouches for rows the store does not have (another signals.uri, deleted files)
            raise RuntimeError(f"resume from {pick[0]}: windows {lost[:5]}{'...' if len(lost) > 5 else ''} of rank "
                               f"{self.info.rank} are not committed in {self.cfg.signals.uri}; their samples would "
                               "have no signal (resume with the store the checkpoint was written with)")
        self.resumed_from = self.steps
        self.rows_before = self.trained  # a checkpoint follows a commit: each sample trained so far has its row
        console(f"teacher: resumed from {pick[0]} (step {self.steps}, rank {self.info.rank} at batch "
                f"{self.batches}{', exhausted' if self.exhausted else ''})", self.info.rank)
        return self.steps

    # ---- the loop ----------------------------------------------------------------------------------------------
    def run(self, eval_out: str | None = None) -> dict:
        """One pass over the training days (or teacher.steps steps), resuming from a checkpoint if configured,
        then the next-day evaluation; returns the summary (`eval/<metric>/<task>` keys from :meth:`evaluate`)."""
        start = self.maybe_resume()
        it, trained0 = iter(self.loader()), self.trained
        for _ in range(self.batches):  # the loader is deterministic: skip the batches the checkpoint trained on
            self._filler = next(it, None)  # the last one is the filler an exhausted rank forwards, as before
            if self._filler is None:
                raise RuntimeError(f"resume: the data has fewer than {self.batches} batches for rank {self.info.rank}")
        t0 = time.perf_counter()
        self.log.start(self.steps, self.trained)
        last_loss = torch.tensor(float("nan"))  # of this rank's last step with data (a filler step's is 0)
        ws = self.cfg.signals.window_steps
        while self.cfg.teacher.steps is None or self.steps < self.cfg.teacher.steps:
            nxt = self._next_batch(it)
            if nxt is None:
                break
            batch, valid = nxt
            loss = self.train_step(batch, valid)
            if valid:
                last_loss = loss
            self.trained += valid
            self.steps += 1
            if self.steps % ws == 0:
                self._window_done()
            self.log.step(self, last_loss)
        if self.writer is not None:
            self.writer.commit_window()  # the last, partial window
        if self.cfg.teacher.checkpoint_dir and self.steps > start and self._saved_step != self.steps:
            self.checkpoint()  # a finished run resumes as finished: nothing replayed
        secs = time.perf_counter() - t0
        self.log.close()
        stats = self.writer.stats if self.writer is not None else None
        summary = {"rank": self.info.rank, "steps": self.steps, "trained_samples": self.trained,
                   "batches": self.batches, "resumed_from_step": self.resumed_from, "seconds": secs,
                   "samples_per_s": (self.trained - trained0) / max(secs, 1e-9),
                   "loss": float(last_loss),
                   "signals/rows_written": stats.rows_written if stats else 0,
                   "signals/rows_dropped_committed": stats.rows_dropped_committed if stats else 0,
                   "signals/write_s": stats.write_s if stats else 0.0,
                   **{f"stream/{k}": v for k, v in self.metrics.compute().items()}}
        summary.update({f"eval/{k}": v for k, v in self.evaluate(out_path=eval_out).items()})
        return summary

    def close(self, ok: bool = True) -> None:
        """Stop the writer (also after an error). `ok=False` (leaving on an error): the open window is *not*
        committed — it holds only the rows up to the failure, and a resumed run must rewrite it whole."""
        if self.writer is not None:
            self.writer.close(commit=ok)
            self.writer = None
        self.log.close()


def _test_kill_hook(rank: int, step: int) -> None:
    """Test-only crash injection: RECDISTILL_TEST_KILL_AT='RANK:STEP' SIGKILLs that rank's process at that step,
    after the step's signals were queued and before its backward (tests/train/test_teacher_checkpoint.py)."""
    spec = os.environ.get("RECDISTILL_TEST_KILL_AT")
    if spec and spec == f"{rank}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    """Entry point for torchrun / the deepspeed launcher / a single process."""
    p = argparse.ArgumentParser(description="recdistill teacher trainer")
    add_config_arguments(p)
    p.add_argument("--summary", default=None, help="write each rank's summary JSON to this path + .rank{r}.json")
    p.add_argument("--eval-out", default=None, metavar="PATH",
                   help="rank 0 writes the eval days' predictions here (.npz: sample_id, pred_<task> = true-space "
                   "probability for binary tasks / value for continuous ones, label_<task>, p_true_<task>)")
    p.add_argument("--run-dir", default=None, help="tracking directory (metrics.jsonl, W&B, config.yaml); default "
                   "tracking.run_dir/<tracking.run_name or experiment.name-teacher-TIMESTAMP>")
    # The deepspeed launcher appends --local_rank=N (and sets LOCAL_RANK too, which init_distributed reads).
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
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
