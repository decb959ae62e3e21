"""`recdistill stream`: the streaming phase after a batch run (recdistill/stream_phase.py).

    recdistill stream --resume-from runs/demo-X                          # the batch run's own config.yaml
    recdistill stream --resume-from runs/demo-X --set stream.rate=2000   # publish 2,000 rows/s
    recdistill stream --resume-from runs/demo-X --set stream.backend=redis --set stream.start_server=true
    recdistill stream --config configs/experiments/streaming.yaml --resume-from runs/streaming-X

The batch run must have been made with the same `stream.days` (its training days stop before the streaming days,
and its students keep checkpoints to start from). The streaming teacher runs on the batch teacher's ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

from recdistill.config import add_config_arguments, load_config
from recdistill.errors import UsageError
from recdistill.tracking import Tracker, console


def run(args) -> int:  # noqa: ANN001 - argparse.Namespace
    """Run the streaming phase of the batch run `--resume-from`; print the per-day table and where the report is."""
    from recdistill.stream_phase import run_stream_phase

    batch_dir = Path(args.resume_from)
    saved = batch_dir / "config.yaml"
    if not saved.is_file():
        raise UsageError(f"--resume-from {batch_dir}: no config.yaml there",
                         fix="give the run directory of a batch run (recdistill demo / experiment)")
    cfg = load_config(args.config or [saved], args.overrides)
    with Tracker(cfg.tracking, batch_dir / "stream", cfg.model_dump(mode="json"), name=f"{batch_dir.name}-stream") as t:
        out = run_stream_phase(cfg, batch_dir, tracker=t)
    console(json.dumps(out["join"], default=str))
    console(f"stream: report {out['report']}")
    return 0


def register(sub) -> None:  # noqa: ANN001 - argparse subparsers
    """Add `recdistill stream`."""
    p = sub.add_parser("stream", help="the streaming phase (teacher, joiner, students on live streams) after a "
                       "batch run")
    add_config_arguments(p, config_help="YAML config (default: the batch run's config.yaml); repeat to merge")
    p.add_argument("--resume-from", required=True, metavar="RUN_DIR", help="the batch run to continue from")
    p.set_defaults(func=run)
