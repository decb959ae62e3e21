"""Materialize committed signals into long-term storage: one Parquet partition per window plus a manifest.

    recdistill signals compact SRC DST

Reads only committed shards of SRC (verifying checksums; a corrupt shard stops the compaction), writes
``DST/window=W/part-0.parquet`` (all ranks of the window, rows as stored) and finally ``DST/_manifest.json``
(windows, files, rows, sha256, the teacher metadata). SignalReader reads DST like the live store, so later
student runs reproduce exactly what an earlier run saw.
"""

from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from recdistill.signals.reader import decode_table
from recdistill.signals.schema import (
    COMMITS,
    MANIFEST,
    Commit,
    SignalError,
    check_compatible,
    parse_commit_name,
    sha256,
    shard_path,
)
from recdistill.signals.writer import atomic_write


def committed(fs: fsspec.AbstractFileSystem, root: str) -> dict[tuple[int, int], Commit]:
    """(window, rank) -> commit marker, for every commit marker under root."""
    d = f"{root}/{COMMITS}"
    out = {}
    for name in sorted(fs.ls(d, detail=False)) if fs.exists(d) else []:
        parsed = parse_commit_name(name)
        if parsed is not None:
            out[parsed] = Commit.from_json(fs.cat_file(name).decode(), name)
    return out


def compact(src: str, dst: str) -> dict:
    """Compact the committed windows of `src` into `dst`; returns the manifest."""
    sfs, sroot = fsspec.core.url_to_fs(src)
    dfs, droot = fsspec.core.url_to_fs(dst)
    sroot, droot = sroot.rstrip("/"), droot.rstrip("/")
    commits = committed(sfs, sroot)
    if not commits:
        raise SignalError(f"{src}: no committed shards to compact")
    by_window: dict[int, list[pa.Table]] = {}
    meta = None
    for (window, rank), c in sorted(commits.items()):
        path = shard_path(sroot, window, rank)
        data = sfs.cat_file(path)
        if sha256(data) != c.sha256:
            raise SignalError(f"{path}: checksum mismatch (file changed or truncated after commit)")
        shard_meta, table = decode_table(data, path, "arrow")
        check_compatible(shard_meta, path, reference=meta)
        meta = meta or shard_meta
        by_window.setdefault(window, []).append(table)
    partitions = []
    for window, tables in sorted(by_window.items()):
        table = pa.concat_tables(tables)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        rel = f"window={window}/part-0.parquet"
        atomic_write(dfs, f"{droot}/{rel}", data)
        partitions.append({"window": window, "path": rel, "rows": table.num_rows, "sha256": sha256(data),
                           "ranks": sorted(r for w, r in commits if w == window)})
    manifest = {"source": src, "meta": json.loads(meta.model_dump_json()), "partitions": partitions,
                "rows": sum(p["rows"] for p in partitions)}
    atomic_write(dfs, f"{droot}/{MANIFEST}", json.dumps(manifest, indent=1).encode())  # last: the store is ready
    return manifest
