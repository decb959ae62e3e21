"""`recdistill student`: train, evaluate and export one student against a committed teacher-signal store.

    recdistill student --config configs/demo.yaml --set student.signals_uri=runs/demo-x/signals
    recdistill student --config configs/demo.yaml --set student.towers=single --set student.tower_loss=task
    recdistill student --config configs/demo.yaml --name exact --set student.debias=exact --set student.beta=auto

Outputs go to a new run directory under tracking.run_dir: config.yaml, <name>.summary.json,
<name>.eval_preds.npz, the exported main tower and metrics.jsonl / W&B.
"""

from __future__ import annotations

import json

from recdistill.config import add_config_arguments, config_from_args, save_config
from recdistill.preflight import new_run_dir, open_source, require_store, with_source_tasks
from recdistill.tracking import Tracker, console


def run(args) -> int:  # noqa: ANN001 - argparse.Namespace
    """Train one student in a run directory of its own; print its headline numbers and where its files are.

    Checked before the run directory is made: the data (opened, a sample of rows), the signal store a distilling
    student reads, a writable run directory that is no other run's (a config loaded from a run's own
    config.yaml does not make this run reuse that run's name)."""
    from recdistill.train.student import run_student  # torch and the model code: after the cheap checks' imports

    cfg = config_from_args(args)
    source = open_source(cfg)
    cfg = with_source_tasks(cfg, source)
    if cfg.student.tower_loss != "task":
        key = "student.signals_uri" if cfg.student.signals_uri else "signals.uri"  # the student's fallback
        require_store(cfg.student.signals_uri or cfg.signals.uri, key)
    run_dir = new_run_dir(cfg, args.config, args.overrides, args.name)
    save_config(cfg, run_dir)
    with Tracker(cfg.tracking, run_dir, cfg.model_dump(mode="json"), name=run_dir.name) as tracker:
        summary = run_student(cfg, run_dir, name=args.name, tracker=tracker, source=source)
    console(json.dumps({k: v for k, v in summary.items() if k.startswith(("eval/auc", "eval/ne", "signals/"))}))
    console(f"student: outputs in {run_dir}")
    return 0


def register(sub) -> None:  # noqa: ANN001 - argparse subparsers
    """Add `recdistill student`."""
    p = sub.add_parser("student", help="train, evaluate and export one student (one device)")
    add_config_arguments(p)
    p.add_argument("--name", default="student", help="name of this student in logs and file names")
    p.set_defaults(func=run)
