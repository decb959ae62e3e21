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

import math

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
# Salts keep the keep/drop stream independent of other hash uses of the same sample_id.
SAMPLING_SALT = 0x5A3D_1E55


class SamplingConfig(BaseModel):
    """How one view of the data was sampled. Recorded with every Batch, Parquet file and signal shard."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("full", description="Id of this view (e.g. 'teacher', 'student'); shown in reports.")
    r: float = Field(1.0, gt=0.0, le=1.0, description="Negative keep-rate.")
    q: float = Field(1.0, gt=0.0, le=1.0, description="Nominal positive keep-rate.")
    q_eff: list[float] | None = Field(
        None,
        description="Effective positive keep-rate per traffic source (index = traffic id); None means q for all. "
        "This is what the sampler really applies and what debias uses.",
    )
    b: float = Field(0.0, description="Additive bias of the correction g(z) = z + log r - log q_eff + b.")
    seed: int = Field(0, description="Keep/drop hash seed. Views must share it to nest.")
    task: str = Field("ctr", description="Binary task whose label decides positive vs negative.")

    @model_validator(mode="after")
    def _check_q_eff(self) -> SamplingConfig:
        for i, v in enumerate(self.q_eff or []):
            if not (0.0 < v <= 1.0):
                raise ValueError(f"q_eff[{i}]={v} must be in (0, 1]")
        return self

    def q_for(self, num_traffic: int) -> np.ndarray:
        """Effective positive keep-rate per traffic id, length num_traffic (float64)."""
        if self.q_eff is None:
            return np.full(num_traffic, self.q, dtype=np.float64)
        if len(self.q_eff) < num_traffic:
            raise ValueError(f"sampling '{self.name}': q_eff has {len(self.q_eff)} entries, "
                             f"data has {num_traffic} traffic sources")
        return np.asarray(self.q_eff[:num_traffic], dtype=np.float64)

    def correction(self, traffic: torch.Tensor, num_traffic: int) -> torch.Tensor:
        """Per-sample additive term c so that true-space logit = sampled-space logit + c (float32, traffic's device)."""
        q = self.q_for(num_traffic)
        table = torch.as_tensor(math.log(self.r) - np.log(q) + self.b, dtype=torch.float32, device=traffic.device)
        return table[traffic.long()]

    def is_full(self) -> bool:
        """True if this view keeps everything (no correction needed)."""
        return self.r == 1.0 and self.q == 1.0 and all(v == 1.0 for v in (self.q_eff or [])) and self.b == 0.0


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


def keep_mask(sample_id: np.ndarray, positive: np.ndarray, traffic: np.ndarray, cfg: SamplingConfig,
              num_traffic: int) -> np.ndarray:
    """Boolean keep decision per sample under view `cfg` (negatives kept with r, positives with q_eff[traffic])."""
    u = hash_uniform(sample_id, cfg.seed, SAMPLING_SALT)
    rate = np.where(np.asarray(positive, dtype=bool), cfg.q_for(num_traffic)[np.asarray(traffic)], cfg.r)
    return u < rate
