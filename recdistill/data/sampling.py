"""Negative down-sampling / positive retention, and the logit correction it implies.

Keep/drop is a deterministic function of (sample_id, seed, rate): every view draws the same uniform number
u(sample_id, seed) and keeps a sample when u < its rate. Two views with the same seed therefore *nest*: a view
whose rates are all lower than another's keeps a subset of that view's samples (the student finds a teacher
signal for each of its samples).

Correction (DESIGN §4): keeping negatives with probability r and positives with q multiplies the odds by q/r,
so a sampled-space logit is the true-space logit + log q - log r. The map back to the true space is
``g(z) = z + log(r) - log(q_eff[traffic]) + b``.
"""

from __future__ import annotations

import numpy as np

from recdistill.config import SamplingConfig
from recdistill.hashing import hash_uniform, splitmix64

# Salts keep the keep/drop stream independent of other hash uses of the same sample_id.
SAMPLING_SALT = 0x5A3D_1E55

__all__ = ["SAMPLING_SALT", "SamplingConfig", "hash_uniform", "keep_mask", "maybe_kept", "splitmix64"]


def keep_mask(sample_id: np.ndarray, positive: np.ndarray, traffic: np.ndarray, cfg: SamplingConfig,
              num_traffic: int) -> np.ndarray:
    """Boolean keep decision per sample under view `cfg` (negatives kept with r, positives with q_eff[traffic])."""
    u = hash_uniform(sample_id, cfg.seed, SAMPLING_SALT)
    rate = np.where(np.asarray(positive, dtype=bool), cfg.q_for(num_traffic)[np.asarray(traffic)], cfg.r)
    return u < rate


def maybe_kept(sample_id: np.ndarray, cfg: SamplingConfig, num_traffic: int) -> np.ndarray:
    """Rows `cfg` may keep, decided from sample ids alone: u < the highest keep-rate of any label or traffic.

    A superset of :func:`keep_mask` (same u, a rate at least as high), so a source can drop the others before it
    computes their labels; at r = 0.1 and q <= 0.9 that is a tenth of the rows.
    """
    top = max(cfg.r, float(cfg.q_for(num_traffic).max()))
    return hash_uniform(sample_id, cfg.seed, SAMPLING_SALT) < top
