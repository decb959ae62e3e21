"""`recdistill demo` and `recdistill experiment`: one teacher, N students, a transferability report.

    recdistill demo                                                      # the embedded default (configs/demo.yaml)
    recdistill demo --set data.source=parquet --set data.path=DIR        # bring-your-own data
    recdistill demo --config configs/teacher/tiny.yaml                   # merged over configs/demo.yaml
    recdistill demo --resume RUN_DIR                                     # continue an interrupted run
    recdistill experiment --config configs/demo.yaml --config configs/experiments/ablations.yaml

Before anything is created or launched, the data is opened and a sample of its rows checked, every student's
overrides are validated, the signal stores to be read must hold committed shards and the run directory must be
writable and not another run's.
"""

from __future__ import annotations

import time
from pathlib import Path

from recdistill.config import Config, add_config_arguments, apply_overrides, load_config
from recdistill.errors import UsageError
from recdistill.experiment import default_config_path, run_experiment
from recdistill.preflight import new_run_dir, open_source, require_store, with_source_tasks
from recdistill.report import markdown_table
from recdistill.tracking import Tracker, console


def _config(args) -> tuple[Config, list[str]]:  # noqa: ANN001 - argparse.Namespace
    """The resolved config and the files it came from: for `demo`, configs/demo.yaml under any --config files;
    with --resume, the run's own saved config.yaml (plus --set overrides)."""
    if args.resume:
        if args.config:
            raise UsageError("--resume continues a run with its own config.yaml; --config cannot change it",
                             fix="drop --config (--set KEY=VALUE still applies, e.g. --set tracking.progress=false)")
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise UsageError(f"--resume {args.resume}: no config.yaml there",
                             fix="give the run directory that `recdistill demo` printed (runs/<name>)")
        return load_config(saved, args.overrides), [str(saved)]
    default = default_config_path() if args.command == "demo" else None
    paths = ([str(default)] if default else []) + list(args.config or [])
    cfg = load_config(paths, args.overrides)
    if getattr(args, "streaming", False) and not cfg.stream.days:  # 4 streaming days after the batch days
        args.overrides = ["stream.days=4", f"data.num_days={cfg.data.num_days + 4}", *args.overrides]
        cfg = load_config(paths, args.overrides)
    return cfg, paths


def _preflight(cfg: Config) -> None:
    """Every student's overrides valid, and every signal store the run will read holds committed shards."""
    if cfg.experiment.teacher_signals:
        require_store(cfg.experiment.teacher_signals, "experiment.teacher_signals")
    for run in cfg.experiment.students:
        scfg = apply_overrides(cfg, run.set, origin=f"experiment.students[{run.name}]")
        if scfg.student.signals_uri and scfg.student.tower_loss != "task":
            require_store(scfg.student.signals_uri, f"student '{run.name}': student.signals_uri")


def run(args) -> int:  # noqa: ANN001 - argparse.Namespace
    """`recdistill demo` / `recdistill experiment`: check, run, then print where everything went."""
    cfg, paths = _config(args)
    source = open_source(cfg)
    cfg = with_source_tasks(cfg, source)
    _preflight(cfg)
    run_dir = Path(args.resume) if args.resume else new_run_dir(cfg, paths, args.overrides, cfg.experiment.name)
    run_dir.mkdir(parents=True, exist_ok=bool(args.resume))
    verb = "resuming" if args.resume else "run directory"
    console(f"{args.command}: {verb} {run_dir} (config: {', '.join(paths) or 'defaults'})")
    t0 = time.perf_counter()
    with Tracker(cfg.tracking, run_dir, cfg.model_dump(mode="json"), name=run_dir.name) as tracker:
        out = run_experiment(cfg, run_dir, tracker, source=source, resume=bool(args.resume))
        if getattr(args, "streaming", False):
            from recdistill.stream_phase import run_stream_phase

            out["stream"] = run_stream_phase(cfg, run_dir, tracker=tracker, source=source)
        wandb_dir = tracker.wandb_dir
    console("\n" + markdown_table(out["auc_rows"]) + "\n")
    if out["gain_rows"]:
        console(markdown_table(out["gain_rows"]) + "\n")
    if "stream" in out:
        console(f"{args.command}: streaming phase: report {out['stream']['report']}")
    console(f"{args.command}: done in {time.perf_counter() - t0:.0f} s")
    console(f"{args.command}: report {out['report']}; plots {run_dir}/*.png; metrics {run_dir / 'metrics.jsonl'}")
    console(f"{args.command}: teacher signals {run_dir / 'signals'}; students and exported main towers "
            f"{run_dir / 'students'}; W&B {wandb_dir or 'off'}")
    return 0


def register(sub) -> None:  # noqa: ANN001 - argparse subparsers
    """Add `recdistill demo` and `recdistill experiment`."""
    for name, text, config_help in (
            ("demo", "the main job end to end on the embedded default (configs/demo.yaml)",
             "YAML config merged over configs/demo.yaml (the demo's defaults); repeat to merge several in order"),
            ("experiment", "one teacher and the students of experiment.students, compared",
             "YAML config file (default: built-in defaults); repeat to merge several in order")):
        p = sub.add_parser(name, help=text)
        add_config_arguments(p, config_help=config_help)
        p.add_argument("--resume", metavar="RUN_DIR", default=None,
                       help="continue an interrupted run in RUN_DIR with its saved config.yaml: the teacher from its "
                       "newest checkpoint (or reused if it had finished), then every student")
        p.add_argument("--streaming", action="store_true",
                       help="then run the streaming phase (recdistill stream) on the same run: stream.days "
                       "(default 4, added to data.num_days) after the batch days, the teacher on its batch-phase ranks")
        p.set_defaults(func=run)
