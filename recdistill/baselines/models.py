"""The two baseline learners on the engineered features: L2 logistic regression (torch, full-batch L-BFGS, fp64) and
a gradient-boosted tree model (LightGBM) with a fixed, modest configuration. Both return sampled-space logits: they
are fit on a sampled view, and the caller maps their outputs to the true space with that view's correction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recdistill.hashing import hash_uniform
from recdistill.runtime import usable_cores

#: Salt of the GBDT's early-stopping rows (independent of the target-encoding folds).
VALID_SALT = 0xE5_70_9
#: Share of the training rows held out for the GBDT's early stopping (never the evaluation days).
VALID_SHARE = 0.1

#: LightGBM settings: a fixed configuration of the usual size for tabular CTR baselines, not tuned per world;
#: early stopping on the held-out training rows picks the number of trees up to GBDT_TREES.
GBDT_TREES = 300
GBDT_PARAMS = {"objective": "binary", "learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 100,
               "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0, "max_bin": 63,
               "verbosity": -1, "deterministic": True, "force_row_wise": True}
GBDT_PATIENCE = 30


@dataclass
class LogisticModel:
    """Standardisation and weights of a fitted logistic regression."""

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: float

    def logit(self, x: np.ndarray) -> np.ndarray:
        """Logits of rows `x` [n, F]."""
        return ((x - self.mean) / self.scale) @ self.weight + self.bias


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = 1e-4, max_iter: int = 100) -> LogisticModel:
    """L2-regularised logistic regression on standardised columns (mean log loss + l2/2 |w|^2), full-batch L-BFGS
    in fp64: the problem is convex and small; after 100 quasi-Newton steps the ranking no longer changes in the
    fourth digit of AUC."""
    mean = x.mean(0)
    scale = x.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)  # constant columns stay constant (zero) instead of dividing by 0
    xs = torch.from_numpy((x - mean) / scale)
    yt = torch.from_numpy(y.astype(np.float64))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    p0 = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
    b = torch.tensor(np.log(p0 / (1 - p0)), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, yt) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LogisticModel(mean, scale, w.detach().numpy().copy(), float(b.detach()))


def valid_rows(sample_id: np.ndarray, seed: int = 0) -> np.ndarray:
    """Bool mask of the training rows held out for early stopping (VALID_SHARE of them, by a hash of sample id)."""
    return hash_uniform(sample_id, seed, VALID_SALT) < VALID_SHARE


def fit_gbdt(x: np.ndarray, y: np.ndarray, valid: np.ndarray, *, seed: int = 0,
             threads: int | None = None):  # noqa: ANN201 - a lightgbm.Booster (lightgbm is imported on use)
    """LightGBM on the rows not in `valid`, early-stopped on the `valid` rows; returns the Booster (best iteration
    kept). `threads`: default 2, or 1 where this process may use at most 2 cores."""
    import lightgbm as lgb  # imported on use: the rest of the package does not need it

    # LightGBM's OpenMP threads spin while they wait for each other: on a 2-core machine where anything else runs
    # (a teacher, the loader, another job) 2 threads were an order of magnitude slower than 1.
    threads = threads or (2 if usable_cores() > 2 else 1)
    params = {**GBDT_PARAMS, "seed": seed, "num_threads": threads}
    train = lgb.Dataset(x[~valid], y[~valid], free_raw_data=True)
    val = lgb.Dataset(x[valid], y[valid], reference=train, free_raw_data=True)
    return lgb.train(params, train, num_boost_round=GBDT_TREES, valid_sets=[val],
                     callbacks=[lgb.early_stopping(GBDT_PATIENCE, verbose=False)])


def gbdt_logit(booster, x: np.ndarray) -> np.ndarray:  # noqa: ANN001 - lightgbm.Booster
    """Raw (logit) scores of rows `x` at the booster's best iteration."""
    return booster.predict(x, raw_score=True, num_iteration=booster.best_iteration or None)
