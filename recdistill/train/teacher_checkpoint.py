"""When the teacher checkpoints, what it records, and resuming from the newest complete checkpoint.

The files and their atomicity are recdistill/train/checkpoint.py's; this module holds the teacher's rules:

- a checkpoint is taken only right after a signal window was committed, and after the writer flushed it (the
  commit markers of every sealed window are on the store first), so a restart from it replays no committed row
  and loses none (SignalWriter docstring);
- every `teacher.checkpoint_every` committed windows, and once at the end of the run;
- run-level meta (rank 0's): steps, last committed window, window size, config digest, the tracking state (run
  directory, W&B run id) that the resumed run continues; per rank: its data position and the valid samples it
  trained. The data position is the loader's (work item, row offset) where its next batch starts and where its
  last one started (recdistill/data/loader.py), besides the real batches taken and whether the loader ran out:
  a resume restarts the loader there and regenerates no consumed batch;
- a checkpoint written before positions were saved (only a count of batches) is resumed by replaying the loader
  up to that count, as it was then: a console line says so, and it costs the data work of the skipped batches;
- a resume is refused when the window size differs, when the checkpoint has no per-rank data position at all, or
  when the store lacks a window the checkpoint vouches for (another signals.uri, deleted files).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from recdistill.config import Config
from recdistill.signals.writer import SignalWriter
from recdistill.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


@dataclass
class Resumed:
    """What a rank resumes from: the run's steps, its own data position and samples, the run's tracking state."""

    path: Path
    steps: int
    trained: int
    batches: int
    exhausted: bool
    tracking: dict[str, Any] = field(default_factory=dict)
    #: the rank's saved data position (LockstepBatches.state()); None in a checkpoint older than positions
    data: dict[str, Any] | None = None


class TeacherCheckpoints:
    """The teacher's checkpoint policy over `teacher.checkpoint_dir` (disabled when it is unset)."""

    def __init__(self, cfg: Config, rank: int, group: dist.ProcessGroup) -> None:
        self.cfg, self.rank, self.group = cfg, rank, group
        self.root = cfg.teacher.checkpoint_dir
        self.saved_step: int | None = None  # step of the last checkpoint this process saved

    @property
    def enabled(self) -> bool:
        """Whether a checkpoint directory is configured."""
        return bool(self.root)

    def due(self, windows: int) -> bool:
        """After `windows` committed windows: is a checkpoint due (every `teacher.checkpoint_every`)?"""
        return self.enabled and windows % self.cfg.teacher.checkpoint_every == 0

    def save(self, steps: int, position: dict[str, Any], *, dmp: torch.nn.Module, engine: Any,
             writers: Sequence[SignalWriter], tracking: dict[str, Any]) -> Path:
        """Collective: flush committed windows to every store, then save. Call only right after a commit.
        `position`: this rank's {'trained'} and LockstepBatches.state(); `tracking`: TrainLog.tracking_state()."""
        for writer in writers:
            writer.flush()  # the commit markers of every sealed window are on the store before the checkpoint
        ws = self.cfg.signals.window_steps
        meta = {"digest": self.cfg.teacher_digest(), "steps": steps, "data_position": "per rank",
                "last_committed_window": steps // ws - 1 if steps % ws == 0 else steps // ws,
                "window_steps": ws, "experiment": self.cfg.experiment.name, "tracking": tracking}
        self.saved_step = steps
        # The data position is per rank: ranks hold different numbers of real batches, so after a filler step
        # "steps done" is no longer "batches consumed" on every rank.
        return save_checkpoint(self.root, step=steps, dmp=dmp, engine=engine, group=self.group, meta=meta,
                               rank_state=position, keep=self.cfg.teacher.checkpoint_keep)

    def resume(self, *, dmp: torch.nn.Module, engine: Any, writers: Sequence[SignalWriter]) -> Resumed | None:
        """Collective: load the newest complete checkpoint when teacher.resume and there is one (rank 0 decides
        which, for every rank); None when starting afresh. Every store of `writers` must hold the windows the
        checkpoint vouches for."""
        if not (self.enabled and self.cfg.teacher.resume):
            return None
        pick = [str(latest_checkpoint(self.root) or "") if self.rank == 0 else None]
        dist.broadcast_object_list(pick, src=0, group=self.group)  # one decision, whatever each rank lists
        if not pick[0]:
            return None
        meta, mine = load_checkpoint(pick[0], dmp=dmp, engine=engine, digest=self.cfg.teacher_digest())
        ws = self.cfg.signals.window_steps
        if meta["window_steps"] != ws:
            raise RuntimeError(f"checkpoint {pick[0]}: window_steps {meta['window_steps']} != {ws}")
        if "batches" not in mine:
            raise RuntimeError(f"checkpoint {pick[0]}: no per-rank data position (written by a teacher that dropped "
                               "each day's last partial batch: its position does not map onto this data order); "
                               "start afresh (teacher.resume=false or another checkpoint_dir)")
        steps = int(meta["steps"])
        for writer in writers:
            lost = [w for w in range(steps // ws) if not writer.is_committed(w)]
            if lost:  # the checkpoint vouches for rows the store does not have (another signals.uri, deleted files)
                raise RuntimeError(f"resume from {pick[0]}: windows {lost[:5]}{'...' if len(lost) > 5 else ''} of "
                                   f"rank {self.rank} are not committed in {writer.uri}; their samples would have no "
                                   "signal (resume with the store the checkpoint was written with)")
        return Resumed(path=Path(pick[0]), steps=steps, trained=int(mine["trained"]), batches=int(mine["batches"]),
                       exhausted=bool(mine["exhausted"]), tracking=meta.get("tracking") or {},
                       data={k: mine[k] for k in ("batches", "exhausted", "position", "last")} if "position" in mine
                       else None)
