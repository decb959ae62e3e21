"""Materialize committed signals into long-term storage: one Parquet partition per window plus a manifest.

    recdistill signals compact SRC DST

Reads only committed shards of SRC (verifying checksums, schema and compatibility; a bad shard stops the
compaction with a message naming it), writes ``DST/window=W/part-<crc32>.parquet`` (all committed ranks of the
window, rows as stored) and finally ``DST/_manifest.json`` (windows, files, rows, ranks, checksums, the teacher
metadata). SignalReader reads DST like the live store, so later student runs reproduce exactly what an earlier
run saw. Incremental: windows already in DST's manifest with the same ranks are kept, not rewritten, so
compacting again while the teacher runs only adds what was committed since. Works window by window, so memory
stays at one window.
"""

from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from recdistill.signals.reader import decode_table
from recdistill.signals.schema import (
    MANIFEST,
    SignalError,
    SignalMeta,
    check_compatible,
    checksum,
    checksum_matches,
    list_commits,
    read_manifest,
    shard_path,
)
from recdistill.signals.writer import atomic_write


def partition_path(window: int, crc: str) -> str:
    """A compacted window's file, relative to the store root, named by its checksum: a window compacted again
    (a rank committed it later) gets a new file, so the old manifest never points at a half-replaced one."""
    return f"window={window}/part-{crc.split(':')[-1]}.parquet"


def compact(src: str, dst: str) -> dict:
    """Compact the committed windows of `src` into `dst`; returns the manifest (as written, meta as a dict)."""
    sfs, sroot = fsspec.core.url_to_fs(src)
    dfs, droot = fsspec.core.url_to_fs(dst)
    sroot, droot = sroot.rstrip("/"), droot.rstrip("/")
    commits = list_commits(sfs, sroot)
    if not commits:
        raise SignalError(f"{src}: no committed shards to compact")
    old = read_manifest(dfs, droot)
    meta: SignalMeta | None = old["meta"] if old else None
    done = {p["window"]: p for p in old["partitions"]} if old else {}
    by_window: dict[int, list[int]] = {}
    for window, rank in sorted(commits):
        by_window.setdefault(window, []).append(rank)
    partitions = []
    for window, ranks in sorted(by_window.items()):
        if window in done and done[window]["ranks"] == ranks:
            partitions.append(done[window])
            continue
        tables = []
        for rank in ranks:
            path, c = shard_path(sroot, window, rank), commits[(window, rank)]
            data = sfs.cat_file(path)
            if not checksum_matches(data, c.checksum):
                raise SignalError(f"{path}: checksum mismatch (file changed or truncated after commit)")
            shard_meta, table = decode_table(data, path, "arrow")
            check_compatible(shard_meta, path, reference=meta)
            meta = meta or shard_meta
            tables.append(table)
        sink = pa.BufferOutputStream()
        pq.write_table(pa.concat_tables(tables), sink)
        data = sink.getvalue()
        crc = checksum(data)
        atomic_write(dfs, f"{droot}/{partition_path(window, crc)}", data)
        partitions.append({"window": window, "path": partition_path(window, crc), "ranks": ranks,
                           "rows": sum(t.num_rows for t in tables), "checksum": crc})
    manifest = {"source": src, "meta": json.loads(meta.model_dump_json()), "partitions": partitions,
                "rows": sum(p["rows"] for p in partitions)}
    # Last, and in one atomic put: a reader sees the old manifest or the new one, each naming complete files.
    atomic_write(dfs, f"{droot}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
    for stale in {p["path"] for p in done.values()} - {p["path"] for p in partitions}:
        dfs.rm(f"{droot}/{stale}")
    return manifest
