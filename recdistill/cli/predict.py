"""`recdistill predict`: score data with an exported student (its .pt2 and .json sidecar) into a Parquet file.

    recdistill predict --model runs/x/student_main_tower.pt2 --data DIR --out preds.parquet
    recdistill predict --model runs/x/student_main_tower.pt2 --config configs/demo.yaml --out preds.parquet
    recdistill predict --model M.pt2 --data DIR --days 3,4 --batch-size 8192 --out preds.parquet

--data DIR reads a Parquet directory in the DESIGN §4 layout; without it the configured data source is read
(--config / --set, e.g. the synthetic world). Default days: the evaluation days (the last data.eval_days). The
output has `sample_id` and `pred_<task>` per task (true-space probability for binary tasks, the value for
continuous ones), one row per input row. Exit codes: 0 ok, 1 unusable model or data (the message names the file),
2 bad config or arguments.
"""

from __future__ import annotations

import sys

from recdistill.config import add_config_arguments, config_from_args
from recdistill.data.parquet import DataError
from recdistill.tracking import console


def _fail(msg: str, code: int) -> int:
    print(f"recdistill predict: {msg}", file=sys.stderr)
    return code


def _days(arg: str | None, have: list[int], eval_days: int) -> list[int]:
    """--days as a list (ValueError with the fix when malformed or absent from the data)."""
    if not arg:
        return have[-eval_days:]
    try:
        days = [int(d) for d in arg.split(",")]
    except ValueError:
        raise ValueError(f"--days {arg!r}: expected comma-separated integers, e.g. 3,4") from None
    missing = sorted(set(days) - set(have))
    if missing:
        raise ValueError(f"--days {missing} not in the data (it has {have})")
    return days


def run(args) -> int:  # noqa: ANN001 - argparse.Namespace
    """Load the model, open the data, score the days, print where the predictions are."""
    from recdistill.data.source import build_source
    from recdistill.serve import ServeError, load_served, predict

    if args.data:  # after the user's --set, so that --data wins over a configured source
        args.overrides = [*args.overrides, "data.source=parquet", f"data.path={args.data}"]
    cfg = config_from_args(args)
    try:
        model = load_served(args.model)
        source = build_source(cfg.data)
    except (ServeError, DataError) as exc:
        return _fail(str(exc), 1)
    try:
        days = _days(args.days, source.days(), cfg.data.eval_days)
    except ValueError as exc:
        return _fail(str(exc), 2)
    try:
        res = predict(model, source, days, args.out, batch_size=args.batch_size or cfg.data.batch_size,
                      show_progress=cfg.tracking.progress)
    except DataError as exc:
        return _fail(str(exc), 1)
    console(f"predict: {res['rows']} rows of days {days} scored, tasks {model.spec.tasks} -> {res['path']}")
    return 0


def register(sub) -> None:  # noqa: ANN001 - argparse subparsers
    """Add `recdistill predict`."""
    p = sub.add_parser("predict", help="score data with an exported student into a Parquet file")
    p.add_argument("--model", required=True, help="exported main tower (<name>_main_tower.pt2, its .json beside it)")
    p.add_argument("--data", metavar="DIR", help="Parquet directory (DESIGN §4 layout); default: the configured "
                                                 "data source")
    p.add_argument("--out", required=True, help="Parquet file to write: sample_id, pred_<task>")
    p.add_argument("--days", help="comma-separated days to score (default: the last data.eval_days)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per program call (default: data.batch_size)")
    add_config_arguments(p)
    p.set_defaults(func=run)
