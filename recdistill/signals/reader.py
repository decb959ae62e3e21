"""The student's signal reader: committed shards only, vectorised join by sample_id (DESIGN §4 'Signal store').

    reader = SignalReader(uri, tasks=["ctr", "cvr"], teacher_version=None)
    logits, found = reader.lookup(batch.sample_id)     # [B, T] float32 raw teacher logits, [B] bool
    reader.refresh()                                   # pick up windows committed since (1-to-N, live teacher)

Reads both forms: the live store (Arrow IPC shards + commit markers) and a compacted store (Parquet partitions +
_manifest.json, see compact.py). Duplicates (the same sample id in
several rows) resolve to the highest teacher_step; rows with non-finite logits are never returned as found.
The join is a vectorised hash lookup (signals/index.py): ~20M ids/s against 10M stored rows on 2 cores, where
a searchsorted over the sorted ids managed ~1.6M/s. A refresh that adds windows rebuilds the index (O(rows)).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recdistill.signals.index import HashIndex
from recdistill.signals.schema import (
    COMMITS,
    MANIFEST,
    META_KEY,
    Commit,
    SignalError,
    SignalMeta,
    check_compatible,
    parse_commit_name,
    sha256,
    shard_path,
)


@dataclass
class ReaderStats:
    """Counters of one reader (cumulative over lookups)."""

    rows: int = 0  # stored rows loaded (before de-duplication)
    duplicates: int = 0  # rows superseded by a row of the same sample id with a higher teacher_step
    non_finite_rows: int = 0  # stored unique rows whose logits are NaN or inf
    corrupt_shards: int = 0  # skipped with on_corrupt='skip'
    lookups: int = 0
    missing: int = 0  # looked-up ids with no stored row
    rejected_non_finite: int = 0  # looked-up ids whose stored logits are not finite


def decode_table(data: bytes, where: str, kind: str) -> tuple[SignalMeta, pa.Table]:
    """Parse one shard (Arrow IPC) or compacted partition (Parquet) from bytes; SignalError naming it on failure."""
    try:
        table = pa.ipc.open_file(pa.py_buffer(data)).read_all() if kind == "arrow" else pq.read_table(
            pa.BufferReader(data))
        meta = SignalMeta.model_validate_json(table.schema.metadata[META_KEY])
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt / foreign files all end here
        raise SignalError(f"{where}: unreadable signal shard: {exc}") from None
    names = table.schema.names
    if names != ["sample_id", "logits", "teacher_step"]:
        raise SignalError(f"{where}: columns {names}, expected ['sample_id', 'logits', 'teacher_step']")
    return meta, table


class SignalReader:
    """Committed teacher signals of one run, joined by sample id (see module docstring)."""

    def __init__(self, uri: str, *, tasks: list[str] | None = None, teacher_version: str | None = None,
                 windows: Iterable[int] | None = None, on_corrupt: str = "raise") -> None:
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        self.fs, root = fsspec.core.url_to_fs(uri)
        self.uri, self.root = uri, root.rstrip("/")
        self.tasks, self.teacher_version, self.on_corrupt = tasks, teacher_version, on_corrupt
        self.window_filter = set(windows) if windows is not None else None
        self.meta: SignalMeta | None = None
        self.stats = ReaderStats()
        self.loaded: set[tuple[int, int]] = set()  # (window, rank) shards read (or skipped as corrupt)
        self.skipped: set[tuple[int, int]] = set()  # corrupt shards skipped with on_corrupt='skip'
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._ids = np.zeros(0, np.int64)
        self._logits = np.zeros((0, 0), np.float32)
        self._finite = np.zeros(0, bool)
        self._index = HashIndex(self._ids)
        self.refresh()

    @property
    def windows(self) -> list[int]:
        """Windows with at least one shard loaded."""
        return sorted({w for w, _ in self.loaded - self.skipped})

    def _wanted(self, window: int) -> bool:
        return self.window_filter is None or window in self.window_filter

    def refresh(self) -> int:
        """Load shards committed since the last refresh; returns how many were added."""
        added = 0
        manifest = f"{self.root}/{MANIFEST}"
        if self.fs.exists(manifest):
            entries = json.loads(self.fs.cat_file(manifest))["partitions"]
            for e in entries:
                key = (e["window"], -1)
                if key in self.loaded or not self._wanted(e["window"]):
                    continue
                added += self._load(f"{self.root}/{e['path']}", e["sha256"], e["rows"], "parquet", key)
        else:
            d = f"{self.root}/{COMMITS}"
            names = sorted(self.fs.ls(d, detail=False)) if self.fs.exists(d) else []
            for name in names:
                parsed = parse_commit_name(name)
                if parsed is None or parsed in self.loaded or not self._wanted(parsed[0]):
                    continue
                commit = Commit.from_json(self.fs.cat_file(name).decode(), name)
                added += self._load(shard_path(self.root, *parsed), commit.sha256, commit.rows, "arrow", parsed)
        if added:
            self._rebuild()
        return added

    def _load(self, path: str, checksum: str, rows: int, kind: str, key: tuple[int, int]) -> int:
        try:
            data = self.fs.cat_file(path)
            if sha256(data) != checksum:
                raise SignalError(f"{path}: checksum mismatch (file changed or truncated after commit)")
            meta, table = decode_table(data, path, kind)
            if table.num_rows != rows:
                raise SignalError(f"{path}: {table.num_rows} rows, its commit says {rows}")
        except (SignalError, FileNotFoundError) as exc:
            if self.on_corrupt == "raise":
                raise SignalError(str(exc) if isinstance(exc, SignalError) else f"{path}: missing shard") from None
            self.stats.corrupt_shards += 1
            self.loaded.add(key)
            self.skipped.add(key)
            return 0
        check_compatible(meta, path, tasks=self.tasks, teacher_version=self.teacher_version, reference=self.meta)
        self.meta = self.meta or meta
        ids = table.column("sample_id").to_numpy()
        flat = table.column("logits").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        logits = flat.reshape(len(ids), len(meta.tasks)).astype(np.float32, copy=False)
        self._parts.append((ids, logits, table.column("teacher_step").to_numpy()))
        self.stats.rows += len(ids)
        self.loaded.add(key)
        return 1

    def _rebuild(self) -> None:
        """One sorted, de-duplicated array over everything loaded (highest teacher_step wins)."""
        ids = np.concatenate([p[0] for p in self._parts])
        logits = np.concatenate([p[1] for p in self._parts])
        steps = np.concatenate([p[2] for p in self._parts])
        order = np.lexsort((-steps, ids))  # by id, then newest step first
        ids, logits = ids[order], logits[order]
        first = np.ones(len(ids), bool)
        first[1:] = ids[1:] != ids[:-1]
        self.stats.duplicates = int(len(ids) - first.sum())
        self._ids, self._logits = ids[first], logits[first]
        self._finite = np.isfinite(self._logits).all(axis=1)
        self._index = HashIndex(self._ids)
        self.stats.non_finite_rows = int((~self._finite).sum())

    def lookup(self, sample_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw teacher logits [B, T] (zeros where not found) and a found mask [B] (False for missing and for
        non-finite rows), on `sample_ids`' device."""
        q = sample_ids.detach().cpu().numpy().astype(np.int64, copy=False)
        t = len(self.meta.tasks) if self.meta else len(self.tasks or [])
        row = self._index.get(q)
        present = row >= 0
        row = np.where(present, row, 0)
        found = present & self._finite[row] if len(self._ids) else present
        out = self._logits[row] if len(self._ids) else np.zeros((len(q), t), np.float32)
        out[~found] = 0.0
        self.stats.lookups += len(q)
        self.stats.missing += int((~present).sum())
        self.stats.rejected_non_finite += int((present & ~found).sum())
        dev = sample_ids.device
        return torch.from_numpy(out).to(dev), torch.from_numpy(found).to(dev)
