"""`recdistill data`: export a source in the Parquet layout, inspect a Parquet directory.

    recdistill data export DIR                              # the configured source (default: synthetic world)
    recdistill data export DIR --view student --days 0,1    # a sampled view of some days
    recdistill data inspect DIR
"""

from __future__ import annotations

import sys

from recdistill.config import add_config_arguments, config_from_args
from recdistill.data.parquet import DataError, ParquetSource, write_parquet


def run_export(args) -> int:  # noqa: ANN001 - argparse.Namespace
    """Write the configured source (days, view) under DIR."""
    from recdistill.data.loader import build_source

    cfg = config_from_args(args)
    src = build_source(cfg.data)
    days = [int(d) for d in args.days.split(",")] if args.days else src.days()
    missing = sorted(set(days) - set(src.days()))
    if missing:
        print(f"recdistill data export: --days {missing} not in the source (it has {src.days()})", file=sys.stderr)
        return 2
    view = None if args.view == "none" else getattr(cfg.sampling, args.view)
    files = write_parquet(src, args.dir, days=days, view=view, rows_per_file=args.rows_per_file,
                          progress=cfg.tracking.progress)
    rows = ParquetSource(args.dir)
    total = sum(rows.num_rows(d) for d in rows.days())
    print(f"wrote {len(files)} files, {total} rows, days {days}, view {args.view}, to {args.dir}")
    return 0


def run_inspect(args) -> int:  # noqa: ANN001 - argparse.Namespace
    """Print days, rows, column roles, tasks, sampling and label means of a Parquet directory."""
    try:
        src = ParquetSource(args.dir)
    except DataError as exc:
        print(f"recdistill data inspect: {exc}", file=sys.stderr)
        return 1
    s = src.schema
    print(f"{args.dir}: {len(src.files)} files, days {src.days()}")
    print(f"tasks: {', '.join(f'{t.name} ({t.kind})' for t in s.tasks)}")
    print(f"dense: {list(s.dense)}")
    print(f"sparse (cardinality): {s.sparse}")
    print(f"history fields (cardinality): {s.history}")
    print(f"traffic sources: {s.num_traffic}")
    print(f"sampling: {src.sampling.model_dump_json() if src.sampling else 'none recorded (unsampled)'}")
    for d in src.days():
        n = src.num_rows(d)
        b = src.read(d, 0, n)
        means = ", ".join(f"{k}={float(v.mean()):.4f}" for k, v in b.labels.items())
        print(f"  day {d}: {n} rows, mean history {float(b.history.lengths.float().mean()):.0f}, labels {means}")
    return 0


def register(sub) -> None:  # noqa: ANN001 - argparse subparsers
    """Add `recdistill data export|inspect`."""
    p = sub.add_parser("data", help="export or inspect data in the Parquet layout")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    e = dsub.add_parser("export", help="write the configured source as Parquet (DESIGN §4 layout)")
    e.add_argument("dir", help="output directory (any fsspec URI)")
    e.add_argument("--days", default=None, help="comma-separated days (default: all)")
    e.add_argument("--view", choices=["none", "teacher", "student"], default="none",
                   help="write a sampled view (sampling.teacher / sampling.student) instead of every row")
    e.add_argument("--rows-per-file", type=int, default=50_000, help="source rows per file (before sampling)")
    add_config_arguments(e)
    e.set_defaults(func=run_export)
    i = dsub.add_parser("inspect", help="summarise a Parquet directory")
    i.add_argument("dir")
    i.set_defaults(func=run_inspect)
