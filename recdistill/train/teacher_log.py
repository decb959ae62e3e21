"""The teacher's training log: rank 0's progress bar and Tracker (metrics.jsonl + W&B, offline by default).

Every `teacher.log_every` steps one point: train/loss, train/auc/<task> (streaming, last 20K samples of rank 0),
throughput/samples_per_s (all ranks, since the previous point), signals/rows_written (committed, all ranks). A
resumed teacher continues its run: the checkpoint records the run directory and the W&B run id
(:meth:`TrainLog.tracking_state`), and :meth:`TrainLog.resume` picks them up before the tracker opens, so
metrics.jsonl is appended to and W&B continues the same run id. The steps between that checkpoint and the crash
are trained again and logged again: metrics.jsonl then holds two records of those steps, and W&B, which drops a
record whose step is below one it has seen, may keep either.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from recdistill.config import Config, save_config
from recdistill.tracking import Tracker, console, progress
from recdistill.train.distributed import DistInfo

if TYPE_CHECKING:
    from recdistill.train.teacher import TeacherTrainer


class TrainLog:
    """Rank 0's progress bar and Tracker; no-ops on other ranks (they still join the per-point all-reduce)."""

    def __init__(self, cfg: Config, info: DistInfo, run_dir: str | Path | None) -> None:
        """`run_dir`: the tracking directory; default tracking.run_dir/<tracking.run_name or
        experiment.name-teacher-TIMESTAMP> (a resumed run without either reuses its checkpoint's)."""
        self.cfg, self.info, self.every = cfg, info, cfg.teacher.log_every
        self.chosen = bool(run_dir or cfg.tracking.run_name)  # the user named the directory: resume keeps it
        name = cfg.tracking.run_name or f"{cfg.experiment.name}-teacher-{time.strftime('%Y%m%d-%H%M%S')}"
        self.run_dir = Path(run_dir) if run_dir else Path(cfg.tracking.run_dir) / name
        self.resume_id: str | None = None
        self.tracker: Tracker | None = None
        self.bar = None

    def tracking_state(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run continues this one's tracking (rank 0's is written)."""
        return {"run_dir": str(self.run_dir.resolve()),
                "wandb_run_id": self.tracker.run_id if self.tracker is not None else None}

    def resume(self, state: dict[str, Any]) -> None:
        """Continue the tracking recorded by :meth:`tracking_state` (before :meth:`start`): the same W&B run id,
        and the same run directory unless this run was given one."""
        if self.tracker is not None:
            raise RuntimeError("TrainLog.resume after start: the tracker is already open")
        if state.get("run_dir") and not self.chosen:
            self.run_dir = Path(state["run_dir"])
        self.resume_id = state.get("wandb_run_id") or None

    def start(self, steps: int, trained: int) -> None:
        """Open the tracker and the bar at `steps` done (a resumed run continues its step axis)."""
        if self.tracker is None:
            if self.info.rank == 0:
                save_config(self.cfg, self.run_dir)
            self.tracker = Tracker(self.cfg.tracking, self.run_dir, self.cfg.model_dump(mode="json"),
                                   name=self.run_dir.name, rank=self.info.rank, resume_id=self.resume_id)
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
