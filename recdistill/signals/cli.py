"""`recdistill signals inspect|verify|compact`: look at, check and materialize a teacher-signal store.

    recdistill signals inspect URI       # windows, ranks, rows, tasks, teacher version, sampling, missing windows
    recdistill signals verify URI        # checksums, schema, row counts, duplicates, NaNs, orphans; exit 1 on any
    recdistill signals compact SRC DST   # committed windows -> Parquet partitions + manifest (incremental)

URI is any fsspec URI (a local path, memory://..., s3://... with s3fs installed), a live store or a compacted
one (recognised by its _manifest.json).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import fsspec
import numpy as np

from recdistill.signals.compact import compact
from recdistill.signals.reader import decode_table
from recdistill.signals.schema import (
    COMMITS,
    Commit,
    SignalError,
    SignalMeta,
    check_compatible,
    checksum_matches,
    parse_commit_name,
    parse_shard_name,
    read_manifest,
    shard_path,
)


@dataclass
class Entry:
    """One committed shard (live store, rank >= 0) or compacted partition (rank -1, `ranks` from the manifest)."""

    window: int
    rank: int
    path: str
    rows: int
    checksum: str
    ranks: list[int] = field(default_factory=list)
    steps: tuple[int, int] | None = None


def entries(uri: str) -> tuple[str, SignalMeta | None, list[Entry], list[str]]:
    """(form 'live'|'compacted', metadata, committed entries, problems met while listing them)."""
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    manifest = read_manifest(fs, root)
    if manifest is not None:
        return "compacted", manifest["meta"], [
            Entry(p["window"], -1, f"{root}/{p['path']}", p["rows"], p["checksum"], p["ranks"])
            for p in manifest["partitions"]], []
    d = f"{root}/{COMMITS}"
    out, problems, meta = [], [], None
    for name in sorted(fs.ls(d, detail=False)) if fs.exists(d) else []:
        parsed = parse_commit_name(name)
        if parsed is None:
            continue
        try:
            c = Commit.from_json(fs.cat_file(name).decode(), name)
        except SignalError as exc:
            problems.append(str(exc))
            continue
        meta = meta or c.meta
        out.append(Entry(c.window, c.rank, shard_path(root, c.window, c.rank), c.rows, c.checksum, [c.rank],
                         (c.step_min, c.step_max)))
    return "live", meta, sorted(out, key=lambda e: (e.window, e.rank)), problems


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
    for w in windows:
        es = [e for e in found if e.window == w]
        line = f"  window {w}: ranks {sorted(r for e in es for r in e.ranks)}, {sum(e.rows for e in es)} rows"
        if all(e.steps for e in es):
            line += f", steps {min(e.steps[0] for e in es)}..{max(e.steps[1] for e in es)}"
        print(line)
    return 0


def verify(uri: str) -> list[str]:
    """Every problem of a store, as messages naming the file (an empty list: healthy)."""
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    try:
        form, _, found, problems = entries(uri)
    except SignalError as exc:
        return [str(exc)]
    reference, ids, non_finite = None, [], 0
    for e in found:
        try:
            data = fs.cat_file(e.path)
        except FileNotFoundError:
            problems.append(f"{e.path}: committed but missing")
            continue
        if not checksum_matches(data, e.checksum):
            problems.append(f"{e.path}: checksum mismatch (file changed or truncated after commit)")
            continue
        try:
            meta, table = decode_table(data, e.path, "parquet" if form == "compacted" else "arrow")
            check_compatible(meta, e.path, reference=reference)
        except SignalError as exc:
            problems.append(str(exc))
            continue
        reference = reference or meta
        if table.num_rows != e.rows:
            problems.append(f"{e.path}: {table.num_rows} rows, its {'manifest' if e.rank < 0 else 'commit'} says "
                            f"{e.rows}")
        ids.append(table.column("sample_id").to_numpy())
        flat = table.column("logits").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        non_finite += int((~np.isfinite(flat.reshape(table.num_rows, -1)).all(axis=1)).sum())
    if ids:
        all_ids = np.concatenate(ids)
        dup = len(all_ids) - len(np.unique(all_ids))
        if dup:
            problems.append(f"{uri}: {dup} duplicate sample ids across committed shards")
    if non_finite:
        problems.append(f"{uri}: {non_finite} rows with non-finite logits (readers reject them)")
    problems += _strays(fs, root, form, {e.path for e in found})
    return problems


def _strays(fs, root: str, form: str, known: set[str]) -> list[str]:  # noqa: ANN001
    """Files a reader ignores: uncommitted shards and temp files of crashed writers, unreferenced partitions."""
    out = []
    for path in fs.find(root) if fs.exists(root) else []:
        if ".tmp-" in path:
            out.append(f"{path}: temp file of an interrupted write (removed when that rank's writer restarts)")
        elif form == "live" and f"/{COMMITS}/" not in path and parse_shard_name(path) and path not in known:
            out.append(f"{path}: shard without a commit marker (orphan of a crashed writer; invisible to "
                       "readers, removed when that rank's writer restarts)")
        elif form == "compacted" and path.endswith(".parquet") and path not in known:
            out.append(f"{path}: partition not in the manifest (ignored by readers)")
    return out


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
    i.add_argument("uri")
    i.set_defaults(func=run_inspect)
    v = s.add_parser("verify", help="checksums, schema, duplicates, orphans; exit 1 on any problem")
    v.add_argument("uri")
    v.set_defaults(func=run_verify)
    c = s.add_parser("compact", help="committed windows -> Parquet partitions + manifest (incremental)")
    c.add_argument("src")
    c.add_argument("dst")
    c.set_defaults(func=run_compact)
