"""`recdistill signals inspect|verify|compact`: look at, check and materialize a teacher-signal store.

    recdistill signals inspect URI       # windows, ranks, rows, tasks, teacher version, sampling, missing windows,
                                         # windows missing a rank
    recdistill signals verify URI        # checksums, schema, row counts, duplicates, NaNs, orphans, no committed
                                         # shard at all; exit 1 on any
    recdistill signals compact SRC DST   # committed windows -> Parquet partitions + manifest (incremental)

URI is any fsspec URI (a local path, memory://..., s3://... with s3fs installed), a live store or a compacted
one (recognised by its _manifest.json).
"""

from __future__ import annotations

import sys

from recdistill.signals.check import entries, missing_ranks, verify
from recdistill.signals.compact import compact
from recdistill.signals.schema import SignalError


def run_inspect(args) -> int:  # noqa: ANN001 - argparse.Namespace
    """Print what a store holds; exit 1 when it holds nothing."""
    form, meta, found, problems = entries(args.uri)
    for p in problems:
        print(f"PROBLEM {p}")
    if not found:
        print(f"{args.uri}: no committed shards")
        return 1
    windows = sorted({e.window for e in found})
    ranks = sorted({r for e in found for r in e.ranks})
    print(f"{args.uri}: {form} store, {len(found)} {'partitions' if form == 'compacted' else 'committed shards'}, "
          f"windows {windows[0]}..{windows[-1]}, ranks {ranks}, {sum(e.rows for e in found)} rows")
    print(f"run {meta.run_id}, teacher version {meta.teacher_version}, schema v{meta.schema_version}")
    print(f"tasks: {meta.tasks}")
    print(f"teacher sampling: {meta.sampling.model_dump_json()}")
    gaps = sorted(set(range(windows[0], windows[-1] + 1)) - set(windows))
    print(f"missing windows: {gaps or 'none'}")
    short = missing_ranks(found)
    print("windows missing a rank: " + (", ".join(f"{w} (ranks {r})" for w, r in short.items()) or "none"))
    for w in windows:
        es = [e for e in found if e.window == w]
        line = f"  window {w}: ranks {sorted(r for e in es for r in e.ranks)}, {sum(e.rows for e in es)} rows"
        if all(e.steps for e in es):
            line += f", steps {min(e.steps[0] for e in es)}..{max(e.steps[1] for e in es)}"
        print(line)
    return 0


def run_verify(args) -> int:  # noqa: ANN001 - argparse.Namespace
    """Print every problem; exit 1 if there is any."""
    problems = verify(args.uri)
    for p in problems:
        print(f"PROBLEM {p}")
    print(f"{args.uri}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def run_compact(args) -> int:  # noqa: ANN001 - argparse.Namespace
    """Compact SRC into DST; exit 1 (message on stderr) if a shard is bad or nothing is committed."""
    try:
        manifest = compact(args.src, args.dst)
    except SignalError as exc:
        print(f"recdistill signals compact: {exc}", file=sys.stderr)
        return 1
    print(f"compacted {len(manifest['partitions'])} windows, {manifest['rows']} rows into {args.dst}")
    return 0


def register(sub) -> None:  # noqa: ANN001 - argparse subparsers
    """Add `recdistill signals inspect|verify|compact`."""
    p = sub.add_parser("signals", help="inspect, verify or compact a teacher-signal store")
    s = p.add_subparsers(dest="signals_command", required=True, metavar="ACTION")
    i = s.add_parser("inspect", help="windows, ranks, rows, tasks, teacher version, sampling, missing windows")
    i.add_argument("uri", help="the store: a live one (a teacher's signals/) or a compacted one (any fsspec URI)")
    i.set_defaults(func=run_inspect)
    v = s.add_parser("verify", help="checksums, schema, duplicates, orphans; exit 1 on any problem")
    v.add_argument("uri", help="the store: a live one (a teacher's signals/) or a compacted one (any fsspec URI)")
    v.set_defaults(func=run_verify)
    c = s.add_parser("compact", help="committed windows -> Parquet partitions + manifest (incremental)")
    c.add_argument("src", help="a live store with committed shards (a teacher's signals/)")
    c.add_argument("dst", help="where the Parquet partitions and _manifest.json go (long-term storage; any fsspec "
                   "URI); windows already there are kept")
    c.set_defaults(func=run_compact)
