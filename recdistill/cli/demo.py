"""`recdistill demo` and `recdistill experiment`: one teacher, N students, a transferability report.

    recdistill demo                                                      # the embedded default (configs/demo.yaml)
    recdistill demo --set data.source=parquet --set data.path=DIR        # bring-your-own data
    recdistill experiment --config configs/demo.yaml --config configs/experiments/ablations.yaml
"""

from __future__ import annotations

import time

from recdistill.config import add_config_arguments, load_config
from recdistill.experiment import default_config_path, make_run_dir, run_experiment
from recdistill.report import markdown_table
from recdistill.tracking import Tracker, console


def run(args) -> int:  # noqa: ANN001 - argparse.Namespace
    """`recdistill demo` / `recdistill experiment`: run, then print where everything went."""
    default = default_config_path() if args.command == "demo" else None
    path = args.config if args.config else ([default] if default else None)
    cfg = load_config(path, args.overrides)
    run_dir = make_run_dir(cfg)
    console(f"{args.command}: run directory {run_dir} (config: {', '.join(map(str, path or [])) or 'defaults'})")
    t0 = time.perf_counter()
    with Tracker(cfg.tracking, run_dir, cfg.model_dump(mode="json"), name=run_dir.name) as tracker:
        out = run_experiment(cfg, run_dir, tracker)
        wandb_dir = tracker.wandb_dir
    console("\n" + markdown_table(out["auc_rows"]) + "\n")
    if out["gain_rows"]:
        console(markdown_table(out["gain_rows"]) + "\n")
    console(f"{args.command}: done in {time.perf_counter() - t0:.0f} s")
    console(f"{args.command}: report {out['report']}; plots {run_dir}/*.png; metrics {run_dir / 'metrics.jsonl'}")
    console(f"{args.command}: teacher signals {run_dir / 'signals'}; students and exported main towers "
            f"{run_dir / 'students'}; W&B {wandb_dir or 'off'}")
    return 0


def register(sub) -> None:  # noqa: ANN001 - argparse subparsers
    """Add `recdistill demo` and `recdistill experiment`."""
    p = sub.add_parser("demo", help="the main job end to end on the embedded default (configs/demo.yaml)")
    add_config_arguments(p)
    p.set_defaults(func=run)
    p = sub.add_parser("experiment", help="one teacher and the students of experiment.students, compared")
    add_config_arguments(p)
    p.set_defaults(func=run)
