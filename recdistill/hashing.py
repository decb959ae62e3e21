"""Counter hashes on numpy arrays: the one source of deterministic pseudo-randomness keyed by ids.

Sampling (keep/drop per sample id), the synthetic world (every sampled quantity is a function of (seed, id)) and
the signal index (hash order) all use these. A leaf module: numpy only, nothing from recdistill.
"""

from __future__ import annotations

import functools

import numpy as np


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser on uint64 (wrapping arithmetic): a fast, well-mixed counter hash."""
    x = np.asarray(x, dtype=np.uint64)
    if x.ndim == 0:  # numpy scalars warn when they wrap around, arrays do not (and need no np.errstate, ~5 us a call)
        return _mix(x.reshape(1))[0]
    return _mix(x)


def _mix(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@functools.lru_cache(maxsize=4096)
def _stream_key(seed: int, salt: int) -> np.uint64:
    return splitmix64(np.uint64((seed * 0x2545F4914F6CDD1D + salt) & 0xFFFFFFFFFFFFFFFF))


def hash_uniform(ids: np.ndarray, seed: int, salt: int = 0) -> np.ndarray:
    """Uniform [0, 1) float64 per id, a deterministic function of (id, seed, salt)."""
    h = splitmix64(np.asarray(ids).astype(np.uint64) ^ _stream_key(seed, salt))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
