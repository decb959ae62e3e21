"""Experiment tracking: W&B (offline by default) plus a metrics.jsonl that is always written, and console progress.

Only rank 0 tracks and prints; other ranks get no-ops, so trainers call these unconditionally. The rank comes from
the `rank` argument or, when it is None, from the `RANK` environment variable that torchrun and the deepspeed
launcher set (0 when absent).

A resumed job continues its W&B run: pass the `run_id` of the first attempt (`Tracker.run_id`, kept e.g. in a
checkpoint) as `resume_id`, and W&B appends to that run (``resume="allow"``: a new run of that id if the server has
none). Offline, each attempt gets its own ``offline-run-<time>-<id>`` directory with the same id, and `wandb sync`
puts them into the one run. metrics.jsonl is opened for appending, so it continues too.

W&B's own files go under the run directory (``run_dir/wandb/``), never the working directory; `WANDB_MODE` in the
environment wins over the config (so ``WANDB_MODE=disabled make demo`` turns W&B off). W&B keeps a small log of its
service process under ``~/.cache/wandb/logs`` whatever the mode; nothing else leaves the run directory. An offline
run can be uploaded later with ``wandb sync RUN_DIR/wandb/offline-run-*``.

Usage::

    with Tracker(cfg.tracking, run_dir, cfg.model_dump(mode="json"), name=run_dir.name, rank=rank) as tracker:
        for step, batch in enumerate(progress(loader, total=n, desc="train", rank=rank)):
            ...
            tracker.log({"loss/train": loss, "throughput/samples_per_s": sps}, step=step)
        tracker.summary({"auc/ctr": 0.74})
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from recdistill.config import TrackingConfig

T = TypeVar("T")

# Progress-bar refresh: often enough to look alive in a terminal; in a log file (stderr not a TTY: CI, SLURM,
# torchrun) each refresh appends a line, so refresh rarely there. A run shorter than that prints start and end.
_TTY_INTERVAL_S = 0.5
_LOG_INTERVAL_S = 30.0


def _rank(rank: int | None = None) -> int:
    return rank if rank is not None else int(os.environ.get("RANK", "0"))


def console(msg: str, rank: int | None = None) -> None:
    """Print `msg` to stdout on rank 0 only (through tqdm, so it does not break a progress bar; flushed, so it
    interleaves correctly with other processes' output)."""
    if _rank(rank) == 0:
        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()


def progress(iterable: Iterable[T] | None = None, total: int | None = None, desc: str = "", enabled: bool = True,
             rank: int | None = None, unit: str = "it") -> tqdm:
    """A tqdm progress bar on stderr for rank 0; a silent pass-through elsewhere or when not `enabled`.

    Iterate it like `iterable`, or call ``.update(n)`` / ``.set_postfix(...)`` / ``.close()`` on it when
    `iterable` is None (a manual bar of `total` steps); the disabled bar accepts the same calls and does nothing.
    Refreshes every 0.5 s in a terminal and every 30 s when stderr is a file or pipe, so logs stay short.
    """
    active = enabled and _rank(rank) == 0
    interval = _TTY_INTERVAL_S if sys.stderr.isatty() else _LOG_INTERVAL_S
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not active, mininterval=interval,
                dynamic_ncols=True, leave=True, file=sys.stderr)


def _scalar(v: Any) -> Any:
    """Tensors and numpy 0-d values as Python numbers (W&B and json take those); anything else unchanged."""
    return v.item() if hasattr(v, "item") and getattr(v, "ndim", None) == 0 else v


def _jsonable(v: Any) -> Any:
    """JSON value of a metric: NaN becomes null and ±inf the strings 'inf' / '-inf' (JSON has neither)."""
    v = _scalar(v)
    if isinstance(v, numbers.Real) and not isinstance(v, (bool, int)):
        v = float(v)
        if not math.isfinite(v):
            return None if math.isnan(v) else str(v)
    return v


class Tracker:
    """One run's tracking: `log(metrics, step)`, `summary(values)`, `save_file(path)`, `finish()`.

    Writes ``run_dir/metrics.jsonl`` (one JSON object per `log` call with its `step` and wall `time`, and one
    ``{"summary": {...}}`` line per `summary` call) and, unless the W&B mode is 'disabled', a W&B run whose files
    live in ``run_dir/wandb``. On ranks other than 0 every method is a no-op and nothing is written.
    Use as a context manager so the run is closed on error too (W&B then records a non-zero exit code).
    """

    def __init__(self, cfg: TrackingConfig, run_dir: str | Path, config: dict | None = None, name: str | None = None,
                 rank: int | None = None, resume_id: str | None = None) -> None:
        """`resume_id`: the W&B run id of an earlier attempt of this job to continue (None: a new run)."""
        self.rank = _rank(rank)
        self.run_dir = Path(run_dir)
        self.mode = os.environ.get("WANDB_MODE") or cfg.mode
        self._wandb = None
        self._jsonl = None
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Line-buffered append: each record reaches the file when logged, so a crashed run keeps its metrics and a
        # resumed run appends to them.
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in finish()
        if self.mode != "disabled":
            import wandb  # imported here: slow to import, and not needed when tracking is off

            os.environ.setdefault("WANDB_SILENT", "true")
            resume = {"id": resume_id, "resume": "allow"} if resume_id else {}
            self._wandb = wandb.init(project=cfg.project, name=name or self.run_dir.name, dir=str(self.run_dir),
                                     config=config or {}, mode=self.mode, reinit="finish_previous", **resume)

    @property
    def run_id(self) -> str | None:
        """The W&B run id (what a resumed attempt passes as `resume_id`); None when W&B is off or on other ranks."""
        return self._wandb.id if self._wandb is not None else None

    @property
    def wandb_dir(self) -> Path | None:
        """Directory of this W&B run's files (``run_dir/wandb/offline-run-...`` offline); None when W&B is off or on
        ranks other than 0."""
        return Path(self._wandb.dir).parent if self._wandb is not None else None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Record metrics (namespaced keys with units, e.g. 'throughput/samples_per_s') at `step`.

        Steps should not decrease: W&B drops a record whose step is below one it has already seen (metrics.jsonl
        keeps it). Tensor values are read with ``.item()``: call at logging intervals, not every step, on a GPU.
        """
        if self._jsonl is None:
            return
        values = {k: _scalar(v) for k, v in metrics.items()}
        record = {"step": step, "time": round(time.time(), 3), **{k: _jsonable(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(values, step=step)  # W&B takes NaN and inf as they are

    def summary(self, values: dict[str, Any]) -> None:
        """Record final values: the W&B run summary, and a ``{"summary": ...}`` line in metrics.jsonl."""
        if self._jsonl is None:
            return
        vals = {k: _scalar(v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"summary": {k: _jsonable(v) for k, v in vals.items()}}) + "\n")
        if self._wandb is not None:
            self._wandb.summary.update(vals)

    def save_file(self, path: str | Path) -> None:
        """Attach a file of the run (a report, a plot, a config) to the W&B run: linked into its files/ folder
        (uploaded with it online or by `wandb sync`). No-op when W&B is off; the file itself stays where it is."""
        if self._wandb is not None:
            path = Path(path).resolve()
            self._wandb.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self, exit_code: int = 0) -> None:
        """Close the W&B run and the JSONL file (idempotent)."""
        if self._wandb is not None:
            import wandb

            self._wandb.finish(exit_code=exit_code)
            # wandb's finish() can return before its service process has written the run's records; teardown waits
            # for the service to flush and exit (the next Tracker in this process starts a new service).
            wandb.teardown()
            self._wandb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.finish(exit_code=1 if exc_type is not None else 0)


def _unjson(v: Any) -> Any:
    """Inverse of _jsonable for what it can invert: the strings 'inf' / '-inf' back to floats (NaN stays None)."""
    return float(v) if v in ("inf", "-inf") else v


def read_metrics(run_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read ``run_dir/metrics.jsonl`` back: (the logged records in order, the merged summary). NaN comes back as
    None (JSON null), infinities as floats again."""
    records: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            obj = json.loads(line)
            if "summary" in obj and len(obj) == 1:
                summary.update({k: _unjson(v) for k, v in obj["summary"].items()})
            else:
                records.append({k: _unjson(v) for k, v in obj.items()})
    return records, summary
