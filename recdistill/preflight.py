"""Checks that run before any work: a command that will fail on its input fails at once, with one line, and
leaves nothing behind (no run directory, no half-written output, no launched process).

    src = open_source(cfg)                 # data.path, columns, metadata, a sample of rows; data.tasks
    require_store(uri, "student.signals_uri")   # a signal store with committed shards
    run_dir = new_run_dir(cfg, args.config, args.overrides, prefix="demo")   # a writable, unused name (not created)

`recdistill demo`, `experiment`, `student`, `data inspect` and `signals verify` call these before they create a
run directory or start the teacher.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import fsspec

from recdistill.config import Config, ConfigError, TaskConfig
from recdistill.data.parquet import DataError, ParquetSource
from recdistill.data.source import DataSource, build_source, stored_source
from recdistill.errors import RunError
from recdistill.signals.check import entries
from recdistill.signals.schema import SignalError

#: Rows of each Parquet file read before a run starts (the whole directory: `recdistill data inspect --check-rows`).
SAMPLE_ROWS = 1024


def open_source(cfg: Config) -> DataSource:
    """The configured data source, opened (a Parquet directory's files, columns and metadata are read, and the
    first rows of each file checked); a source refusing its config (e.g. data.tasks it lacks) is a ConfigError."""
    if cfg.data.source == "parquet":
        fs, root = fsspec.core.url_to_fs(cfg.data.path)
        if not fs.isdir(root):
            raise DataError(f"data.path={cfg.data.path}: no such directory", fix="set data.path to a directory of "
                            "Parquet files (`recdistill data export DIR` writes one)")
    try:
        src = build_source(cfg.data)
    except (DataError, ConfigError):
        raise  # already the user's one line; the ValueError below would re-wrap them (both are ValueErrors)
    except FileNotFoundError as exc:  # an fsspec path that vanished between listing and opening
        raise DataError(f"{cfg.data.path}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    stored = stored_source(src)  # under data.counts, the Parquet source the counts are made from
    if isinstance(stored, ParquetSource):
        from recdistill.data.check import row_faults

        faults = row_faults(stored, rows_per_file=SAMPLE_ROWS)
        if faults:
            more = f" and {len(faults) - 1} more fault(s)" if len(faults) > 1 else ""
            raise DataError(f"{faults[0]}{more}", fix=f"`recdistill data inspect {cfg.data.path} --check-rows` "
                            "lists every faulty row")
    return src


def with_source_tasks(cfg: Config, src: DataSource) -> Config:
    """`cfg` with data.tasks set to the tasks the source really has, when they differ from the configured ones.

    An unset data.tasks means "the source's own tasks" (MovieLens); a saved config.yaml lists every field, so
    once reloaded (by the teacher's ranks, a student, a resumed run) the default list would read as set by the
    user. Recording the tasks that were used keeps the saved config true; where the source takes its tasks from
    data.tasks (the synthetic world) nothing changes, so neither does the config's digest."""
    used = [(t.name, t.kind) for t in src.schema.tasks]
    if [(t.name, t.kind) for t in cfg.data.tasks] == used:
        return cfg
    out = cfg.model_copy(deep=True)
    out.data.tasks = [TaskConfig(name=n, kind=k) for n, k in used]  # assignment: validated, and marked as set
    return out


def require_store(uri: str, key: str) -> None:
    """SignalError unless `uri` is a signal store with at least one committed shard (or compacted partition)."""
    fix = f"train the teacher first (`recdistill demo`), or set {key} to a store a teacher wrote"
    try:
        fs, root = fsspec.core.url_to_fs(uri)
        if not fs.exists(root):
            raise SignalError(f"{key}={uri}: no such signal store", fix=fix)
        _, _, found, problems = entries(uri)
    except (OSError, ValueError) as exc:
        raise SignalError(f"{key}={uri}: cannot list the store: {exc}") from None
    if not found:
        why = f" ({problems[0]})" if problems else ""
        raise SignalError(f"{key}={uri}: no committed signal shard{why}", fix=fix)


def _writable(path: Path) -> None:
    """RunError unless `path` (which need not exist yet) could be created as a directory by this process."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise RunError(f"tracking.run_dir={path}: {probe} is not a directory",
                       fix="set tracking.run_dir to a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunError(f"tracking.run_dir={path}: {probe} is not writable",
                       fix="set tracking.run_dir to a directory you can write to")


def new_run_dir(cfg: Config, config_paths: list[str] | None, overrides: list[str], prefix: str) -> Path:
    """The run directory of a new run under tracking.run_dir (not created): tracking.run_name, or
    `<prefix>-<timestamp>`. Never another run's directory: a run name that came with a config file from inside
    that run's directory (`--config runs/X/config.yaml`) is dropped for a fresh name, and an existing run of the
    chosen name is a RunError (resume it with `recdistill demo --resume`, or choose another name)."""
    parent = Path(cfg.tracking.run_dir)
    _writable(parent)
    name = cfg.tracking.run_name
    named_by_user = any(o.split("=", 1)[0].strip() == "tracking.run_name" for o in overrides)
    if name and not named_by_user and any(Path(c).resolve().parent == (parent / name).resolve()
                                          for c in config_paths or []):
        name = None  # the saved config of that run named it: this is a new run
    if name:
        run_dir = parent / name
        if (run_dir / "config.yaml").exists():
            raise RunError(f"{run_dir} already holds a run", fix="choose another tracking.run_name, or continue "
                           f"that run with `recdistill demo --resume {run_dir}`")
        return run_dir
    stamp = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, n = parent / stamp, 1
    while run_dir.exists():  # two runs started within the same second
        n += 1
        run_dir = parent / f"{stamp}-{n}"
    return run_dir
