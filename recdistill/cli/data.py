"""`recdistill data`: export a source in the Parquet layout, inspect a Parquet directory.

    recdistill data export DIR                              # the configured source (default: synthetic world)
    recdistill data export DIR --view student --days 0,1    # a sampled view of some days
    recdistill data export DIR --set data.source=movielens  # MovieLens-100k in the same layout
    recdistill data inspect DIR                             # and a check of the first rows of each file
    recdistill data inspect DIR --check-rows                # every row: each fault with file, column, sample id

Exit codes: 0 ok, 1 unusable data (the message names the file and the column), 2 bad config or arguments.
"""

from __future__ import annotations

import sys

import pyarrow.compute as pc

from recdistill.config import add_config_arguments, config_from_args
from recdistill.data.parquet import DataError, ParquetSource, write_parquet


def _fail(command: str, msg: str, code: int) -> int:
    print(f"recdistill data {command}: {msg}", file=sys.stderr)
    return code


def run_export(args) -> int:  # noqa: ANN001 - argparse.Namespace
    """Write the configured source (days, view) under DIR and print what was written."""
    from recdistill.data.source import build_source

    cfg = config_from_args(args)
    try:  # the stored rows only: counting features (data.counts) are derived whenever the export is read
        src = build_source(cfg.data.model_copy(update={"counts": False}))
    except DataError as exc:
        return _fail("export", str(exc), 1)
    except ValueError as exc:  # a source refusing its config (e.g. data.tasks it does not have)
        return _fail("export", str(exc), 2)
    try:
        days = [int(d) for d in args.days.split(",")] if args.days else src.days()
    except ValueError:
        return _fail("export", f"--days {args.days!r}: expected comma-separated integers, e.g. 0,1,2", 2)
    missing = sorted(set(days) - set(src.days()))
    if missing:
        return _fail("export", f"--days {missing} not in the source (it has {src.days()})", 2)
    view = None if args.view == "none" else getattr(cfg.sampling, args.view)
    try:
        files = write_parquet(src, args.dir, days=days, view=view, rows_per_file=args.rows_per_file,
                              row_group_rows=args.row_group_rows, progress=cfg.tracking.progress)
    except ValueError as exc:  # e.g. a view that keeps more than the source's own sampling
        return _fail("export", str(exc), 2)
    if not files:
        return _fail("export", f"no rows to write (days {days}, view {args.view})", 1)
    out = ParquetSource(args.dir)
    rows = {d: out.num_rows(d) for d in days if d in out.runs}
    print(f"wrote {len(files)} files, {sum(rows.values())} rows ({cfg.data.source}, view {args.view}) to {args.dir}")
    for d in days:
        print(f"  day {d}: {rows.get(d, 0)} rows (of {src.num_rows(d)})")
    return 0


def run_inspect(args) -> int:  # noqa: ANN001 - argparse.Namespace
    """Print days, rows, column roles, tasks, feature roles, sampling and label rates of a Parquet directory."""
    try:
        src = ParquetSource(args.dir)
    except DataError as exc:
        return _fail("inspect", str(exc), 1)
    s = src.schema
    cols = src.columns
    print(f"{args.dir}: {len(src.files)} files, days {src.days()}, {sum(map(src.num_rows, src.days()))} rows")
    roles = [("ids", [c for c in cols if c in ("sample_id", "day", "traffic")]),
             ("labels", [c for c in cols if c.startswith("label_")]),
             ("ground truth", [c for c in cols if c.startswith("p_true_")]),
             ("dense", [c for c in cols if c.startswith("dense_")]),
             ("sparse", [c for c in cols if c.startswith("sparse_")]),
             ("history", [c for c in cols if c.startswith("hist_")])]
    roles.append(("ignored", [c for c in cols if not any(c in names for _, names in roles)]))
    for role, names in roles:
        if names:
            print(f"  {role}: {', '.join(names)}")
    print(f"tasks: {', '.join(f'{t.name} ({t.kind})' for t in s.tasks)}")
    print(f"sparse cardinalities: {s.sparse}")
    print(f"history cardinalities: {s.history}")
    print(f"traffic sources: {s.num_traffic}")
    print("feature roles (data.roles overrides them):")
    for role, value in src.roles.as_dict().items():
        origin = src.role_origin[role]
        shown = {"declared": f"{value} (declared in metadata)" if value else "none (declared in metadata)",
                 "default": f"{value} (default: the conventional name)", "missing": "missing"}[origin]
        print(f"  {role}: {shown}")
    print(f"sampling: {src.sampling.model_dump_json() if src.sampling else 'none recorded (unsampled)'}")
    labels = [f"label_{t.name}" for t in s.tasks]
    for d in src.days():
        t = src.read_columns(d, [*labels, "hist_item"])  # only these columns are decoded
        means = ", ".join(f"{c[6:]}={pc.mean(t.column(c)).as_py():.4f}" for c in labels)
        hist = pc.mean(pc.list_value_length(t.column("hist_item"))).as_py() or 0.0
        print(f"  day {d}: {t.num_rows} rows, label means {means}, mean history length {hist:.1f}")
    return _row_check(src, args)


def _row_check(src: ParquetSource, args) -> int:  # noqa: ANN001 - argparse.Namespace
    """Check rows (every row with --check-rows, else the first rows of each file) and print each fault with its
    file, column and sample ids; 1 if there is any."""
    from recdistill.data.check import row_faults
    from recdistill.preflight import SAMPLE_ROWS

    faults = row_faults(src, rows_per_file=None if args.check_rows else SAMPLE_ROWS)
    for f in faults:
        print(f"FAULT {f}")
    checked = "every row" if args.check_rows else f"the first {SAMPLE_ROWS} rows of each file"
    if not faults:
        print(f"rows: {checked} checked, no fault" + ("" if args.check_rows else " (--check-rows reads every row)"))
        return 0
    hint = "" if args.check_rows else "; --check-rows reads every row"
    return _fail("inspect", f"{len(faults)} fault(s) in {checked} of {args.dir}{hint}", 1)


def register(sub) -> None:  # noqa: ANN001 - argparse subparsers
    """Add `recdistill data export|inspect`."""
    p = sub.add_parser("data", help="export or inspect data in the Parquet layout")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    e = dsub.add_parser("export", help="write the configured source as Parquet (DESIGN §4 layout)")
    e.add_argument("dir", help="output directory (any fsspec URI); files go to DIR/day=D/part-NNNNN.parquet")
    e.add_argument("--days", default=None, help="comma-separated days (default: all)")
    e.add_argument("--view", choices=["none", "teacher", "student"], default="none",
                   help="write only the rows of a sampled view (sampling.teacher / sampling.student) and record it")
    e.add_argument("--rows-per-file", type=int, default=200_000,
                   help="start a new part once a file holds this many rows; files are written a row group at a "
                   "time, so a part can exceed it by up to --row-group-rows - 1 rows")
    e.add_argument("--row-group-rows", type=int, default=4096,
                   help="source rows read and written per row group (bounds memory with long histories)")
    add_config_arguments(e)
    e.set_defaults(func=run_export)
    i = dsub.add_parser("inspect", help="summarise a Parquet directory")
    i.add_argument("dir", help="directory of Parquet files (any fsspec URI), e.g. what `data export` wrote")
    i.add_argument("--check-rows", action="store_true",
                   help="read every row and report each fault (null labels or ids, unequal hist_* lists, ids out of "
                   "range, binary labels other than 0/1) with file, column and sample id; exit 1 on any")
    i.set_defaults(func=run_inspect)
