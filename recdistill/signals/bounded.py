"""A signal reader whose memory is bounded by a budget, not by the store (issue 16 item 5).

    reader = open_reader(uri, memory_mb=512, cache_dir="/tmp/recdistill-signal-index")   # picks the reader
    logits, found = reader.lookup(batch.sample_id)                                     # as SignalReader

Layout: an on-disk index built once per store state, under `cache_dir/<key>/` where the key hashes the committed
shards' (window, rank, checksum, rows), the corrupt policy and the window filter:

- **Segments**: the committed shards in (window, rank) order, cut into runs small enough that indexing one fits
  the budget and four resident ones fit half of it. Each is a SignalIndex (unique ids in hash order, logits,
  finite flags, bucket directory) saved as .npy files and memory-mapped when used: loading one costs no hashing.
- **Global de-duplication**: every row's (hash, teacher_step, segment, row) is spilled into hash-range files sized
  to the budget; each is sorted on its own, and every row but the lowest-step one of an id is removed from its
  segment. So an id lives in at most one segment, and a hit there is the final answer (DESIGN §4: the lowest step).
- **Routing**: the winners' (hash, segment), sorted, one file per hash range: where to look for an id that is in no
  resident segment.

Why segments in teacher-step order and not one index sorted by hash: the student reads its view day by day and the
teacher wrote its windows in step order, which is roughly day order, so consecutive student batches hit the same
one or two segments. A lookup probes the segment the last batch hit, then the one after it (a day-ordered student
crossing into the next part of the store), then the other resident ones; only ids found in none of them are routed
(a binary search in the memory-mapped routing file of their hash range) and their segments mapped, evicting the
least recently hit. A hash-sorted index spreads every batch over the whole store instead: with a store larger than
memory each lookup becomes random I/O, far below the target join rate. The price of this layout: a query stream in
random order (or many ids absent from the store, e.g. a student view not nested in the teacher's) is routed batch
after batch, several times slower than the in-memory reader.

Memory (mapped pages count in the resident set, and leave it when a segment is evicted): at most half the budget
in resident segments, an eighth in routing pages (every routing map is dropped when searches could have touched
that much), the build one segment or one hash range at a time within the budget; on top, the lookup's own buffers,
proportional to the batch. One shard is the smallest unit read, so a budget below one shard's index is exceeded (a
warning says so). `refresh()` rebuilds the index when new commits appear (O(store) time, bounded memory): an
incremental merge would have to rewrite every segment that holds a row superseded by a lower-step one of the new
shards.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections import OrderedDict, deque
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from recdistill.signals.index import SignalIndex, _mix, take_rows
from recdistill.signals.reader import SignalReader
from recdistill.signals.schema import SignalMeta, check_compatible

FORMAT = 1  # bump when the on-disk layout changes: old caches are then ignored
_SPILL = np.dtype([("h", "<u8"), ("step", "<i8"), ("seg", "<i4"), ("row", "<i4")])
_MANIFEST = "index.json"
_NONE = np.zeros(0, np.int64)  # no queries left
_FAULT_BYTES = 64 << 10  # Linux maps up to 16 pages of a file around each fault (fault_around_bytes)
_COLUMNS = ("ids", "logits", "steps", "finite", "directory")  # the files of a segment, SignalIndex.from_unique's order


def resident_bytes_per_row(num_tasks: int) -> int:
    """Bytes a resident (memory-mapped) segment can bring into memory per unique row: id, logits, finite flag,
    ~12 B of bucket directory (2..4 int32 buckets per row). Teacher steps are mapped too but never read by
    lookups."""
    return 8 + 4 * num_tasks + 1 + 12


def build_bytes_per_row(num_tasks: int) -> int:
    """Peak bytes per row of indexing one segment (_save_segment): the shards' columns and their concatenation,
    the sort's hashes, order and sorted copies, the bucket counts, the spill records."""
    return 6 * (8 + 4 * num_tasks + 8) + 8 + 8 + 32 + 24


def segment_bytes_per_row(num_tasks: int) -> int:
    """Budget bytes per row of a segment: building one fits in the budget, and four resident fit in half of it."""
    return max(build_bytes_per_row(num_tasks), 8 * resident_bytes_per_row(num_tasks))


def store_bytes(rows: int, num_tasks: int) -> int:
    """What the in-memory SignalReader holds for `rows` stored rows (id, hash, logits, step, finite flag, bucket
    directory), to pick a reader."""
    return rows * (8 + 8 + 4 * num_tasks + 8 + 1 + 12)


def default_cache_dir() -> str:
    """Where on-disk indexes go when no cache directory is configured."""
    return os.path.join(tempfile.gettempdir(), "recdistill-signal-index")


def open_reader(uri: str, *, memory_mb: float | None, cache_dir: str | None = None, **kw) -> SignalReader:
    """The in-memory SignalReader when `memory_mb` is None or the committed store fits the budget, else a
    BoundedSignalReader with that budget (both join alike; `kw` as SignalReader's)."""
    if memory_mb is None:
        return SignalReader(uri, **kw)
    probe = SignalReader.__new__(SignalReader)  # lists the committed shards without reading one
    probe._init_fields(uri, **kw)
    pending = probe._pending()
    rows = sum(p[2] for p in pending)
    tasks = pending[0][5] if pending else 0
    if store_bytes(rows, tasks) <= memory_mb * 2**20:
        return SignalReader(uri, **kw)
    return BoundedSignalReader(uri, memory_mb=memory_mb, cache_dir=cache_dir, **kw)


class BoundedSignalReader(SignalReader):
    """SignalReader's join through an on-disk index, holding at most about `memory_mb` (see module docstring).

    Same constructor arguments, `lookup`, `stats`, `meta`, `windows`, `refresh` and corrupt-shard policy as
    SignalReader, plus `memory_mb` and `cache_dir` (None: default_cache_dir()).
    """

    def __init__(self, uri: str, *, memory_mb: float, cache_dir: str | None = None, tasks: list[str] | None = None,
                 teacher_version: str | None = None, windows: Iterable[int] | None = None,
                 on_corrupt: str = "raise") -> None:
        if memory_mb <= 0:
            raise ValueError(f"memory_mb must be positive, got {memory_mb}")
        self.budget = int(memory_mb * 2**20)
        self.cache_root = Path(cache_dir or default_cache_dir())
        self.index_dir: Path | None = None
        self._shards: list[tuple] = []  # every committed shard taken so far, (path, checksum, rows, kind, key, T)
        self._segments: OrderedDict[int, SignalIndex] = OrderedDict()  # resident, least recently used first
        self._num_segments = 0
        self.segment_loads = 0  # segments read from disk so far (a cost figure for benchmarks and tests)
        self._routes: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # mapped routing files by hash range
        self._route_pages = 0  # pages routing may have touched since the maps were last dropped
        self._last_hit = -1  # the furthest segment (in store order) that answered part of the last lookup
        super().__init__(uri, tasks=tasks, teacher_version=teacher_version, windows=windows, on_corrupt=on_corrupt)

    # ---- building ----------------------------------------------------------------------------------------------
    def refresh(self) -> int:
        """Take shards committed since the last refresh; rebuilds the on-disk index (or reuses one built for the
        same shards) when there are any. Returns how many readable shards were added."""
        new = self._pending()
        if not new:
            return 0
        before = len(self.loaded - self.skipped)
        shards = sorted(self._shards + new, key=lambda p: p[4])  # skipped shards are not in self._shards
        target = self.cache_root / self._key(shards)
        self._segments.clear()  # the old index's segments would count against the build's memory
        self._routes, self._route_pages, self._last_hit = {}, 0, -1
        built = not (target / _MANIFEST).exists()
        if built:
            self._build(shards, target)
            _release_freed_heap()
        self._open(target, shards, built)
        return len(self.loaded - self.skipped) - before

    def _key(self, shards: list[tuple]) -> str:
        spec = {"format": FORMAT, "on_corrupt": self.on_corrupt, "windows": sorted(self.window_filter or []),
                "shards": [[*p[4], p[1], p[2]] for p in shards]}
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:24]

    def _segment_rows(self, num_tasks: int) -> int:
        return max(1, self.budget // segment_bytes_per_row(num_tasks))

    def _build(self, shards: list[tuple], target: Path) -> None:
        """Write the index of `shards` into a temporary directory and rename it to `target` (another process
        that built the same index first wins; ours is dropped)."""
        self.cache_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=self.cache_root))
        try:
            info = self._write_segments(shards, tmp)
            dups = _dedup_across_segments(tmp, info["segments"], info["parts_bits"])
            info["duplicates"] += dups
            info["non_finite_rows"] = sum(_drop_losers(tmp, s) for s in range(info["segments"]))
            (tmp / _MANIFEST).write_text(json.dumps(info))
            try:
                os.rename(tmp, target)
            except OSError:  # a concurrent reader of the same store renamed its complete copy first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _write_segments(self, shards: list[tuple], d: Path) -> dict:
        """Pass 1: read each shard once (checksums, schema, compatibility, corrupt policy as SignalReader), index
        each segment on its own and spill (hash, step, segment, row) into hash-range files."""
        total = sum(p[2] for p in shards)
        num_tasks = shards[0][5]
        # hash ranges: each range's spill (24 B/row) plus its sort (~40 B/row) within half the budget
        parts_bits = max(0, int(np.ceil(np.log2(max(1, total * 64 * 2 / self.budget)))))
        spills = [open(d / f"spill-{p}.bin", "wb") for p in range(1 << parts_bits)]  # noqa: SIM115 - closed below
        seg_rows, seg, buf, rows, dups, skipped = self._segment_rows(num_tasks), 0, [], 0, 0, []
        first_path = None
        try:
            for i, (path, ck, n, kind, key, _) in enumerate(shards):
                part = self._load(path, ck, n, kind, key)
                if part is None:
                    skipped.append(list(key))
                    continue
                first_path = first_path or path
                buf.append(part)
                rows += len(part[0])
                nxt = shards[i + 1][2] if i + 1 < len(shards) else 0
                if sum(len(p[0]) for p in buf) + nxt > seg_rows or i + 1 == len(shards):
                    dups += _save_segment(d, seg, buf, len(self.meta.tasks), spills, parts_bits)
                    seg, buf = seg + 1, []
            if buf:
                dups += _save_segment(d, seg, buf, len(self.meta.tasks), spills, parts_bits)
                seg += 1
        finally:
            for f in spills:
                f.close()
        if seg and max(np.load(d / f"seg-{s}.ids.npy", mmap_mode="r").shape[0] for s in range(seg)) > seg_rows:
            warnings.warn(f"signals.reader_memory_mb={self.budget / 2**20:.3g}: one shard of {self.uri} is larger "
                          f"than a segment of the budget ({seg_rows} rows); the budget will be exceeded", stacklevel=3)
        meta = self.meta.model_dump_json() if self.meta is not None else None
        return {"segments": seg, "parts_bits": parts_bits, "rows": rows, "duplicates": dups, "skipped": skipped,
                "meta": meta, "first_path": first_path}

    def _open(self, target: Path, shards: list[tuple], built: bool) -> None:
        """Adopt the index at `target` (`built` by this reader, or reused): counts, metadata, segments (none
        resident yet)."""
        info = json.loads((target / _MANIFEST).read_text())
        skipped = {tuple(k) for k in info["skipped"]}
        if info["meta"] is not None:
            meta = SignalMeta.model_validate_json(info["meta"])
            # an index another reader built saw every shard agree with this meta; what this reader expects is
            # checked here (a reader that built it has checked it shard by shard already)
            check_compatible(meta, info["first_path"], tasks=self.tasks, teacher_version=self.teacher_version)
            self.meta = meta
        if not built:  # _load counted the corrupt shards it met while building; a reused index brings its own
            new = skipped - self.skipped
            self.stats.corrupt_shards += len(new)
            self.stats.corrupt_rows += sum(p[2] for p in shards if p[4] in new)  # rows their commits vouched for
        self.skipped |= skipped
        self.stats.rows, self.stats.duplicates = info["rows"], info["duplicates"]
        self.stats.non_finite_rows = info["non_finite_rows"]
        self.index_dir, self._num_segments, self._parts_bits = target, info["segments"], info["parts_bits"]
        self._shards = [p for p in shards if p[4] not in skipped]
        self.loaded.update(p[4] for p in shards)

    # ---- reading -----------------------------------------------------------------------------------------------
    @property
    def sample_ids(self) -> np.ndarray:
        """Every stored sample id once (reads every segment: O(store) memory, for tests and tools)."""
        if self.index_dir is None:
            return np.zeros(0, np.int64)
        return np.concatenate([np.zeros(0, np.int64)] + [np.load(self.index_dir / f"seg-{s}.ids.npy")
                                                          for s in range(self._num_segments)])

    _ids = sample_ids

    def lookup(self, sample_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As SignalReader.lookup: raw teacher logits [B, T] (zeros where not found), found mask [B]."""
        q = sample_ids.detach().cpu().numpy().astype(np.int64, copy=False)
        num_tasks = len(self.meta.tasks) if self.meta is not None else len(self.tasks or [])
        res = (np.zeros((len(q), num_tasks), np.float32), np.zeros(len(q), bool), np.zeros(len(q), bool))
        hits: dict[int, int] = {}
        todo, tried = None, set()  # todo None: every query (no index list on the common path)
        if self._segments:  # the common case first: the segment the last batch hit answers every query
            tried.add(next(reversed(self._segments)))
            todo = self._probe(next(iter(tried)), q, todo, res, hits)
        recent = list(reversed(self._segments))[1:] if todo is not None and todo.size else []  # most recent first
        # The segment after the furthest one the last batch hit comes second, loaded if need be (and the one after
        # it, while guesses hit): a day-ordered student crossing into the next part of the store finds it there
        # without routing every id.
        order = deque([self._last_hit + 1] + recent if todo is None or todo.size else [])
        while order and (todo is None or todo.size):
            s = order.popleft()
            guess = s not in self._segments
            if s in tried or s >= self._num_segments or guess and (todo is None or todo.size * 8 <= len(q)):
                continue  # a few ids left: loading a segment on a guess is dearer than routing them
            tried.add(s)
            before = len(q) if todo is None else todo.size
            todo = self._probe(s, q, todo, res, hits)
            if guess and todo.size < before:
                order.appendleft(s + 1)
        if self._num_segments and (todo is None or todo.size):
            todo = np.arange(len(q)) if todo is None else todo
            seg = self._route(q[todo])
            for s in np.unique(seg[seg >= 0]):
                self._probe(int(s), q, todo[seg == s], res, hits)
        if hits:
            self._last_hit = max(hits)
        out, present, found = res
        self.stats.lookups += len(q)
        self.stats.missing += int((~present).sum())
        self.stats.rejected_non_finite += int((present & ~found).sum())
        dev = sample_ids.device
        return torch.from_numpy(out).to(dev), torch.from_numpy(found).to(dev)

    def _probe(self, s: int, q: np.ndarray, todo: np.ndarray | None, res: tuple, hits: dict[int, int]) -> np.ndarray:
        """Look queries `todo` (None: all, and `res` still empty) up in segment `s`, filling `res` (logits, present,
        found) and `hits`; returns the queries not found there."""
        ix = self._segment(s)
        row = ix.get(q if todo is None else q[todo])
        hit = row >= 0
        n = int(hit.sum())
        if n:
            self._segments.move_to_end(s)  # recency counts hits: probing a segment for nothing does not keep it
            hits[s] = hits.get(s, 0) + n
        if todo is None:  # every query: whole-array writes as the in-memory reader does (the common case)
            row = np.where(hit, row, 0)
            res[1][:] = hit
            res[2][:] = hit & np.take(ix.finite, row)
            res[0][:] = take_rows(ix.logits, row)
            res[0][~res[2]] = 0.0
            return _NONE if n == len(q) else np.flatnonzero(~hit)
        if n:
            at, rows = todo[hit], row[hit]
            res[1][at] = True
            ok = np.take(ix.finite, rows)
            res[2][at] = ok
            res[0][at[ok]] = take_rows(ix.logits, rows[ok])
        return todo[~hit]

    def _segment(self, s: int) -> SignalIndex:
        """Segment `s`, loaded if it is not resident, evicting the least recently hit past half the budget."""
        if s in self._segments:
            return self._segments[s]
        ix = SignalIndex.from_unique(*(np.load(self.index_dir / f"seg-{s}.{c}.npy", mmap_mode="r") for c in _COLUMNS))
        per_row = resident_bytes_per_row(ix.num_tasks)
        while self._segments and per_row * (len(ix) + sum(map(len, self._segments.values()))) > self.budget // 2:
            self._segments.popitem(last=False)
        self._segments[s] = ix
        self.segment_loads += 1
        return ix

    def _route(self, q: np.ndarray) -> np.ndarray:
        """Segment of each queried id, -1 where the store does not hold it (a binary search in the memory-mapped
        routing file of its hash range)."""
        h = _mix(q)
        order = np.argsort(h)  # sorted needles: each hash range is one slice, and the searches walk forward
        hs, bits = h[order], self._parts_bits
        bounds = np.searchsorted(hs, np.arange(1, 1 << bits, dtype=np.uint64) << np.uint64(64 - bits)) if bits else []
        seg = np.full(len(q), -1, np.int32)
        lo = 0
        for p, hi in enumerate([*bounds, len(q)]):
            if hi > lo:
                keys, segs = self._routing(p, hi - lo)
                if len(keys):
                    pos = np.minimum(np.searchsorted(keys, hs[lo:hi]), len(keys) - 1)
                    hit = np.asarray(keys[pos]) == hs[lo:hi]
                    seg[order[lo:hi][hit]] = np.asarray(segs[pos[hit]])
            lo = hi
        return seg

    def _routing(self, p: int, searches: int) -> tuple[np.ndarray, np.ndarray]:
        """The mapped routing arrays of hash range `p`. The pages searches touch stay mapped, so they count in the
        process's resident set: once the searches since the last unmapping may have touched an eighth of the budget
        (sorted searches share the top of the search tree: s of them touch about s * log2(pages / s) pages, and
        never more than the file; a page here is what one fault maps), every map is dropped."""
        if p not in self._routes:
            self._routes[p] = (np.load(self.index_dir / f"route-{p}.h.npy", mmap_mode="r"),
                               np.load(self.index_dir / f"route-{p}.seg.npy", mmap_mode="r"))
        pages = len(self._routes[p][0]) * 12 // _FAULT_BYTES + 2
        self._route_pages += min(pages, searches * (2 + int(np.log2(max(pages / searches, 1)))))
        if self._route_pages * _FAULT_BYTES > self.budget // 8:
            self._routes, self._route_pages = {p: self._routes[p]}, 0
        return self._routes[p]


def _release_freed_heap() -> None:
    """Give the build's freed memory back to the system. glibc keeps freed heap in the process (its mmap threshold
    rises after large frees, so big numpy arrays end up on the heap), where it would stay in the resident set next
    to the segments the lookups then map: build and lookups would add up to more than the budget."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _save_segment(d: Path, seg: int, parts: list[tuple], num_tasks: int, spills: list, parts_bits: int) -> int:
    """Index one segment's rows (duplicates inside it resolved), save it, spill its rows; returns duplicates."""
    ix = SignalIndex(num_tasks)
    dups = ix.add(*(np.concatenate(c) for c in zip(*parts, strict=True)))
    np.save(d / f"seg-{seg}.ids.npy", ix.ids)
    np.save(d / f"seg-{seg}.logits.npy", ix.logits)
    np.save(d / f"seg-{seg}.steps.npy", ix.steps)
    rec = np.empty(len(ix), _SPILL)
    rec["h"], rec["step"], rec["seg"], rec["row"] = ix.h, ix.steps, seg, np.arange(len(ix), dtype=np.int32)
    if parts_bits == 0:
        rec.tofile(spills[0])
        return dups
    # rows are in hash order, so each hash range is one contiguous run
    bounds = np.searchsorted(ix.h, np.arange(1, 1 << parts_bits, dtype=np.uint64) << np.uint64(64 - parts_bits))
    for p, chunk in enumerate(np.split(rec, bounds)):
        chunk.tofile(spills[p])
    return dups


def _dedup_across_segments(d: Path, segments: int, parts_bits: int) -> int:
    """Pass 2: per hash range, keep the lowest-step row of each id (routing file), list the other rows per segment
    (loser files); returns how many rows lost."""
    losers = [open(d / f"losers-{s}.bin", "wb") for s in range(segments)]  # noqa: SIM115 - closed below
    dropped = 0
    try:
        for p in range(1 << parts_bits):
            rec = np.fromfile(d / f"spill-{p}.bin", _SPILL)
            (d / f"spill-{p}.bin").unlink()
            rec = rec[np.lexsort((rec["seg"], rec["step"], rec["h"]))]  # by id, lowest step first
            first = np.ones(len(rec), bool)
            first[1:] = rec["h"][1:] != rec["h"][:-1]
            np.save(d / f"route-{p}.h.npy", rec["h"][first])
            np.save(d / f"route-{p}.seg.npy", rec["seg"][first])
            lost = rec[~first]
            dropped += len(lost)
            for s in np.unique(lost["seg"]):
                lost["row"][lost["seg"] == s].tofile(losers[s])
    finally:
        for f in losers:
            f.close()
    return dropped


def _drop_losers(d: Path, seg: int) -> int:
    """Pass 3: remove from segment `seg` the rows another segment's lower step superseded; returns the segment's
    rows with non-finite logits."""
    lost = np.fromfile(d / f"losers-{seg}.bin", np.int32)
    (d / f"losers-{seg}.bin").unlink()
    cols = [np.load(d / f"seg-{seg}.{c}.npy") for c in _COLUMNS[:3]]
    if lost.size:
        keep = np.ones(len(cols[0]), bool)
        keep[lost] = False
        cols = [c[keep] for c in cols]  # a deletion keeps hash order
    ix = SignalIndex.from_unique(*cols)
    for c, a in zip(_COLUMNS, (ix.ids, ix.logits, ix.steps, ix.finite, ix.directory), strict=True):
        np.save(d / f"seg-{seg}.{c}.npy", a)
    return int((~ix.finite).sum())
