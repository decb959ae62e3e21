"""The reader's join structure: de-duplicated signal rows in hash order plus a linear-probing table (numpy only).

Why a hash table and not `np.searchsorted` over sorted ids: a random lookup against 10M stored ids costs ~23
dependent cache misses in a binary search (well under 1M lookups/s on the 2-core dev machine), two in the bucketed
table below.

Why "hash order": rows are kept sorted by h = splitmix64(id). splitmix64 is a bijection on 64 bits, so equal
hashes are equal ids (duplicates sit side by side and are resolved in one pass), and the bucket of a row (the top
bits of h) is non-decreasing along the rows: each bucket is a contiguous run, so a directory of run starts
(a bincount + cumsum, no probing) is the whole hash table. With at least 2 buckets per row a lookup touches the
directory and one row, rarely two; a few vectorised rounds cover the Poisson tail. New rows are merged in with
one sort of the new rows and an O(n) insert, so a reader's refresh never re-sorts what it already holds.
"""

from __future__ import annotations

import numpy as np

from recdistill.hashing import splitmix64


def _mix(ids: np.ndarray) -> np.ndarray:
    return splitmix64(np.ascontiguousarray(ids, dtype=np.int64).view(np.uint64))


def take_rows(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`a[rows]` for a C-contiguous 2-D array, gathering each row as one opaque item: several times faster
    than numpy's 2-D fancy indexing."""
    a = np.ascontiguousarray(a)
    if a.shape[1] == 0:
        return np.zeros((len(rows), 0), a.dtype)
    items = a.view(np.dtype((np.void, a.dtype.itemsize * a.shape[1]))).reshape(-1)
    return np.take(items, rows).view(a.dtype).reshape(len(rows), a.shape[1])


class SignalIndex:
    """Unique sample ids -> (logits, teacher_step); duplicates keep the row with the lowest teacher_step.

    The lowest step is the forward pass that first trained on the sample, before the teacher saw its label: the
    out-of-sample prediction DESIGN §4 stores. A later row of the same id (a second epoch, a replay) was predicted
    by a teacher that had already learnt that label. Which of two rows of an equal step stays is unspecified (a
step writes one row per sample, so such rows are copies).

    Attributes (all in hash order, one entry per unique id): `ids` int64, `logits` float32 [n, T], `steps`
    int64, `finite` bool (all logits finite). `duplicates` counts rows superseded so far.
    """

    def __init__(self, num_tasks: int) -> None:
        self.num_tasks = num_tasks
        self.h = np.zeros(0, np.uint64)
        self.ids = np.zeros(0, np.int64)
        self.logits = np.zeros((0, num_tasks), np.float32)
        self.steps = np.zeros(0, np.int64)
        self.finite = np.zeros(0, bool)
        self.duplicates = 0
        self._build_table()

    @classmethod
    def from_unique(cls, ids: np.ndarray, logits: np.ndarray, steps: np.ndarray, finite: np.ndarray | None = None,
                    directory: np.ndarray | None = None) -> SignalIndex:
        """An index over rows that are already unique and in hash order (a segment of the on-disk index,
        signals/bounded.py): no sort. Given the `finite` flags and `directory` of a saved index, nothing is
        computed (the arrays may be memory-mapped) and the index is read-only: it holds no hashes to merge by."""
        ix = cls(logits.shape[1])
        ix.ids, ix.logits, ix.steps = ids, logits, steps
        ix.finite = np.isfinite(logits).all(axis=1) if finite is None else finite
        if directory is None:
            ix.h = _mix(ids)
            ix._build_table()
        else:
            ix.h, ix._first = None, directory
            ix._shift = np.uint64(64 - (len(directory) - 1).bit_length() + 1)  # len = 2**bits + 1
        return ix

    @property
    def directory(self) -> np.ndarray:
        """Where each hash bucket's rows start (and, last, where they end): saved with a segment, so that loading
        it needs no hashing."""
        return self._first

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ids: np.ndarray, logits: np.ndarray, steps: np.ndarray) -> int:
        """Merge rows in; returns how many rows (old or new) this superseded as duplicates."""
        if self.h is None:
            raise ValueError("a SignalIndex loaded from a saved directory is read-only")
        if len(ids) == 0:
            return 0
        h = _mix(ids)
        order = np.argsort(h)
        new = (np.take(h, order), np.take(np.asarray(ids, np.int64), order),
               take_rows(np.asarray(logits, np.float32), order), np.take(np.asarray(steps, np.int64), order))
        if len(self.h):
            at = np.searchsorted(self.h, new[0])  # insert before equal keys: stable, both orders are sorted
            cols = [np.insert(old, at, add, axis=0) for old, add in zip(
                (self.h, self.ids, self.logits, self.steps), new, strict=True)]
        else:
            cols = list(new)
        dropped = self._dedup(cols)
        self.h, self.ids, self.logits, self.steps = cols
        self.finite = np.isfinite(self.logits).all(axis=1)
        self.duplicates += dropped
        self._build_table()
        return dropped

    @staticmethod
    def _dedup(cols: list[np.ndarray]) -> int:
        """Keep the lowest-step row of each run of equal hashes (in place on `cols`); returns rows dropped."""
        h, steps = cols[0], cols[3]
        same = np.flatnonzero(h[1:] == h[:-1])
        if same.size == 0:
            return 0
        involved = np.unique(np.concatenate([same, same + 1]))  # every row of a duplicated id (few, usually)
        o = involved[np.lexsort((steps[involved], h[involved]))]  # by id, lowest (first-trained) step first
        first = np.ones(len(o), bool)
        first[1:] = h[o[1:]] != h[o[:-1]]
        keep = np.ones(len(h), bool)
        keep[o[~first]] = False
        cols[:] = [c[keep] for c in cols]
        return int((~first).sum())

    def _build_table(self) -> None:
        n = len(self.h)
        bits = max(4, int(np.ceil(np.log2(max(2 * n, 2)))))  # buckets >= 2n: mean bucket size 1/4 .. 1/2
        self._shift = np.uint64(64 - bits)
        bucket = (self.h >> self._shift).astype(np.int64)
        # rows of bucket b are first[b] .. first[b+1]-1 (rows are in hash order, so each bucket is contiguous)
        counts = np.bincount(bucket, minlength=1 << bits)
        self._first = np.zeros((1 << bits) + 1, np.int32 if n < 2**31 - 1 else np.int64)
        np.cumsum(counts.astype(self._first.dtype), out=self._first[1:])

    def get(self, query: np.ndarray) -> np.ndarray:
        """Row of each queried id in this index's arrays, -1 where absent."""
        q = np.ascontiguousarray(query, dtype=np.int64)
        if len(self.ids) == 0:
            return np.full(len(q), -1, np.int64)
        bucket = (_mix(q) >> self._shift).astype(np.int64)
        lo = np.take(self._first, bucket).astype(np.int64)
        hi = np.take(self._first, bucket + 1)
        # round 0 over every query without index lists (most are settled here); clip: an empty last bucket
        # points one past the end, and lo < hi masks it anyway
        hit = (lo < hi) & (np.take(self.ids, lo, mode="clip") == q)
        out = np.where(hit, lo, -1)
        active = np.flatnonzero(~hit & (lo + 1 < hi))
        k = 1
        while active.size:  # round k compares the k-th row of the buckets that have one; few queries get here
            cand = lo[active] + k
            found = np.take(self.ids, cand) == q[active]
            out[active[found]] = cand[found]
            active = active[~found & (cand + 1 < hi[active])]
            k += 1
        return out
