"""Counter hashes on numpy arrays: the one source of deterministic pseudo-randomness keyed by ids.

Sampling (keep/drop per sample id), the synthetic world (every sampled quantity is a function of (seed, id)) and
the signal index (hash order) all use these. A leaf module: numpy only, nothing from recdistill.
"""

from __future__ import annotations

import numpy as np


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser on uint64 (wrapping arithmetic): a fast, well-mixed counter hash."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hash_uniform(ids: np.ndarray, seed: int, salt: int = 0) -> np.ndarray:
    """Uniform [0, 1) float64 per id, a deterministic function of (id, seed, salt)."""
    ids = np.asarray(ids).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = splitmix64(np.uint64((seed * 0x2545F4914F6CDD1D + salt) & 0xFFFFFFFFFFFFFFFF))
        h = splitmix64(ids ^ key)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
