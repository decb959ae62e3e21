"""What a signal store holds and whether it is healthy: committed entries of a live or compacted store, and
every problem of one (checksums, schema, row counts, duplicates, NaNs, orphans). `recdistill signals` prints them.

URI is any fsspec URI (a local path, memory://..., s3://... with s3fs installed), a live store or a compacted
one (recognised by its _manifest.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import fsspec
import numpy as np

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


def missing_ranks(found: list[Entry]) -> dict[int, list[int]]:
    """Windows where a rank that committed other windows has no shard: {window: [missing ranks]} (live stores;
    a compacted partition lists the ranks it came from)."""
    ranks = {r for e in found for r in e.ranks}
    by_window: dict[int, set[int]] = {}
    for e in found:
        by_window.setdefault(e.window, set()).update(e.ranks)
    return {w: sorted(ranks - have) for w, have in sorted(by_window.items()) if ranks - have}


def verify(uri: str, *, allow_empty: bool = False) -> list[str]:
    """Every problem of a store, as messages naming the file (an empty list: healthy). A path with no committed
    shard is a problem (a mistyped or never-written store) unless `allow_empty`: a writer that has not committed
    yet leaves such a store, which is consistent though empty."""
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    try:
        form, _, found, problems = entries(uri)
    except SignalError as exc:
        return [str(exc)]
    if not found and not allow_empty:
        exists = fs.exists(root)
        return problems + [f"{uri}: {'no committed shard' if exists else 'no such signal store'} (a store holds "
                           "window=W/rank=R.arrow shards with _commits/ markers, or a compacted _manifest.json)"]
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
