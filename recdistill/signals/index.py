"""A vectorised open-addressing hash index from int64 sample ids to row numbers (numpy only).

Why not `np.searchsorted` on the sorted ids: with random lookups against 10M stored ids each query costs ~23
cache misses (1.6M lookups/s on the 2-core dev machine); a half-full linear-probing table costs ~1.5 probes.
Both build and lookup run in "rounds", each vectorised over the keys still unresolved; rounds shrink fast.
"""

from __future__ import annotations

import numpy as np

from recdistill.data.sampling import splitmix64

EMPTY = np.iinfo(np.int64).min  # never a sample id (ids are day << 40 | index, non-negative in practice)


class HashIndex:
    """Maps unique int64 keys to their positions 0..n-1; `get` returns -1 for absent keys."""

    def __init__(self, keys: np.ndarray) -> None:
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        if np.any(keys == EMPTY):
            raise ValueError("HashIndex: int64 min is reserved as the empty marker")
        cap = 16
        while cap < 2 * len(keys):  # load factor <= 0.5 keeps probe chains short
            cap *= 2
        self.mask = np.uint64(cap - 1)
        self.keys = np.full(cap, EMPTY, dtype=np.int64)
        self.rows = np.full(cap, -1, dtype=np.int64)
        slot = self._hash(keys)
        pending = np.arange(len(keys))
        while pending.size:
            s = slot[pending]
            free = self.keys[s] == EMPTY
            cand, cslot = pending[free], s[free]
            taken, first = np.unique(cslot, return_index=True)  # one winner per free slot
            winners = cand[first]
            self.keys[taken] = keys[winners]
            self.rows[taken] = winners
            placed = np.zeros(len(keys), dtype=bool)
            placed[winners] = True
            pending = pending[~placed[pending]]
            # linear probing: every key not placed moves one slot on (slots it passes are now all occupied)
            slot[pending] = (slot[pending] + 1) & self.mask

    def _hash(self, keys: np.ndarray) -> np.ndarray:
        return splitmix64(keys.astype(np.uint64)) & self.mask

    def get(self, query: np.ndarray) -> np.ndarray:
        """Row of each query key, -1 where absent."""
        query = np.asarray(query, dtype=np.int64)
        out = np.full(len(query), -1, dtype=np.int64)
        slot = self._hash(query)
        active = np.arange(len(query))
        while active.size:
            s = slot[active]
            k = self.keys[s]
            hit = k == query[active]
            out[active[hit]] = self.rows[s[hit]]
            active = active[~(hit | (k == EMPTY))]
            slot[active] = (slot[active] + 1) & self.mask
        return out
