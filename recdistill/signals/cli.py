"""`recdistill signals inspect|verify|compact`.

    recdistill signals inspect URI       # windows, ranks, rows, tasks, teacher version, sampling, gaps
    recdistill signals verify URI        # checksums, schema, duplicates, orphans; exit 1 on any problem
    recdistill signals compact SRC DST   # committed windows -> Parquet partitions + manifest
"""

from __future__ import annotations

import sys

import fsspec
import numpy as np

from recdistill.signals.compact import committed, compact
from recdistill.signals.reader import decode_table
from recdistill.signals.schema import COMMITS, SignalError, check_compatible, parse_shard_name, sha256, shard_path


def run_inspect(args) -> int:  # noqa: ANN001 - argparse.Namespace
    """Print what a store holds."""
    fs, root = fsspec.core.url_to_fs(args.uri)
    commits = committed(fs, root.rstrip("/"))
    if not commits:
        print(f"{args.uri}: no committed shards")
        return 1
    windows = sorted({w for w, _ in commits})
    meta = next(iter(commits.values())).meta
    print(f"{args.uri}: {len(commits)} committed shards, windows {windows[0]}..{windows[-1]}")
    print(f"run {meta.run_id}, teacher version {meta.teacher_version}, schema v{meta.schema_version}")
    print(f"tasks: {meta.tasks}")
    print(f"teacher sampling: {meta.sampling.model_dump_json()}")
    gaps = sorted(set(range(windows[0], windows[-1] + 1)) - set(windows))
    print(f"missing windows: {gaps or 'none'}")
    for w in windows:
        ranks = {r: c for (ww, r), c in commits.items() if ww == w}
        rows = sum(c.rows for c in ranks.values())
        steps = (min(c.step_min for c in ranks.values()), max(c.step_max for c in ranks.values()))
        print(f"  window {w}: ranks {sorted(ranks)}, {rows} rows, steps {steps[0]}..{steps[1]}")
    return 0


def verify(uri: str) -> list[str]:
    """Every problem of a store, as messages naming the file (empty list: healthy)."""
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    problems: list[str] = []
    try:
        commits = committed(fs, root)
    except SignalError as exc:
        return [str(exc)]
    reference, ids = None, []
    for (w, r), c in sorted(commits.items()):
        path = shard_path(root, w, r)
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            problems.append(f"{path}: committed but missing")
            continue
        if sha256(data) != c.sha256:
            problems.append(f"{path}: checksum mismatch (file changed or truncated after commit)")
            continue
        try:
            meta, table = decode_table(data, path, "arrow")
            check_compatible(meta, path, reference=reference)
        except SignalError as exc:
            problems.append(str(exc))
            continue
        reference = reference or meta
        if table.num_rows != c.rows:
            problems.append(f"{path}: {table.num_rows} rows, its commit says {c.rows}")
        ids.append(table.column("sample_id").to_numpy())
    if ids:
        all_ids = np.concatenate(ids)
        dup = len(all_ids) - len(np.unique(all_ids))
        if dup:
            problems.append(f"{uri}: {dup} duplicate sample ids across committed shards")
    for path in fs.find(root) if fs.exists(root) else []:
        parsed = parse_shard_name(path)
        if f"/{COMMITS}/" not in path and parsed and parsed not in commits:
            problems.append(f"{path}: shard without a commit marker (orphan of a crashed writer; invisible to "
                            "readers, removed when that rank's writer restarts)")
    return problems


def run_verify(args) -> int:  # noqa: ANN001 - argparse.Namespace
    problems = verify(args.uri)
    for p in problems:
        print(f"PROBLEM {p}")
    print(f"{args.uri}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def run_compact(args) -> int:  # noqa: ANN001 - argparse.Namespace
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
    i = s.add_parser("inspect", help="windows, ranks, rows, tasks, teacher version, sampling")
    i.add_argument("uri")
    i.set_defaults(func=run_inspect)
    v = s.add_parser("verify", help="checksums, schema, duplicates; exit 1 on any problem")
    v.add_argument("uri")
    v.set_defaults(func=run_verify)
    c = s.add_parser("compact", help="committed windows -> Parquet partitions + manifest")
    c.add_argument("src")
    c.add_argument("dst")
    c.set_defaults(func=run_compact)
