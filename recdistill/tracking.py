"""Experiment tracking: W&B (offline by default) plus a metrics.jsonl that is always written, and console progress.

Only rank 0 tracks and prints; other ranks get no-ops, so trainers can call these unconditionally.
W&B's own files go under the run directory (``run_dir/wandb/``), never the working directory; `WANDB_MODE` in the
environment wins over the config (so `WANDB_MODE=disabled make demo` turns W&B off).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from recdistill.config import TrackingConfig

T = TypeVar("T")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def console(msg: str, rank: int | None = None) -> None:
    """Print `msg` on rank 0 only (flushed, so it interleaves correctly with progress bars)."""
    if (rank if rank is not None else _rank()) == 0:
        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()


def progress(it: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True,
             rank: int | None = None) -> Iterator[T]:
    """A tqdm progress bar on rank 0 (updates at most every 2 s when stderr is not a terminal, to keep CI logs
    short); a plain iterator elsewhere or when disabled."""
    if not enabled or (rank if rank is not None else _rank()) != 0:
        return iter(it)
    return iter(tqdm(it, total=total, desc=desc, mininterval=0.5 if sys.stderr.isatty() else 2.0,
                     dynamic_ncols=True, leave=True))


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else str(v)
    return v


class Tracker:
    """One run's tracking: `log(metrics, step)`, `summary(dict)`, `finish()`.

    Writes ``run_dir/metrics.jsonl`` (one JSON object per log call, plus a final ``{"summary": ...}``) and, unless
    the W&B mode is 'disabled', a W&B run whose files live in ``run_dir/wandb``.
    """

    def __init__(self, cfg: TrackingConfig, run_dir: str | Path, config: dict | None = None, name: str | None = None,
                 rank: int | None = None) -> None:
        self.rank = rank if rank is not None else _rank()
        self.run_dir = Path(run_dir)
        self.mode = os.environ.get("WANDB_MODE") or cfg.mode
        self._wandb = None
        self._jsonl = None
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in finish()
        if self.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(project=cfg.project, name=name or self.run_dir.name, dir=str(self.run_dir),
                                     config=config or {}, mode=self.mode, reinit="finish_previous")

    @property
    def wandb_dir(self) -> Path | None:
        """Directory of the W&B run files (None when W&B is off or on non-zero ranks)."""
        return Path(self._wandb.dir).parent if self._wandb is not None else None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Record metrics (namespaced keys with units, e.g. 'throughput/samples_per_s') at `step`."""
        if self._jsonl is None:
            return
        self._jsonl.write(json.dumps({"step": step, "time": time.time(),
                                      **{k: _jsonable(v) for k, v in metrics.items()}}) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        """Record final values (W&B run summary; a `summary` line in metrics.jsonl)."""
        if self._jsonl is None:
            return
        self._jsonl.write(json.dumps({"summary": {k: _jsonable(v) for k, v in values.items()}}) + "\n")
        if self._wandb is not None:
            self._wandb.summary.update(values)

    def finish(self) -> None:
        """Close the W&B run and the JSONL file (idempotent)."""
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()
