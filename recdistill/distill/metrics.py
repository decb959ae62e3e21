"""Evaluation metrics (DESIGN §1 'Measurement').

Conventions:

- Predictions are **true-space probabilities** for binary tasks (the model's logit with its own sampling correction
  applied, then a sigmoid; DESIGN §4 'Sampling and debias') and predicted values for continuous tasks. AUC only
  needs a ranking, so it also accepts logits or any real score; NE and calibration refuse values outside [0, 1].
- Binary labels are 0/1 (any dtype); anything else is refused with a ValueError.
- Optional per-sample ``weights`` (e.g. 1/keep-rate to read down-sampled evaluation data as the true population)
  apply to every metric; with no weights every sample counts once.
- Every metric returns a Python float and NaN where it is undefined (one class only, empty input, zero base rate);
  NaN is logged as such rather than raising, so one degenerate task does not stop an evaluation.

AUC comes from torchmetrics (exact curve, ties counted one half); the weighted AUC, NE, calibration and the MSE
variants are written here and tested against hand counts on small data (tests/test_metrics.py).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc

# Probabilities are clamped to [_EPS, 1 - _EPS] inside the log loss so a confident wrong prediction costs a large
# but finite amount (log(1e-7) = -16.1) instead of inf, as in sklearn's log_loss.
_EPS = 1e-7


def _flat(x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x).detach().flatten().double()


def _check(labels: torch.Tensor, preds: torch.Tensor, weights: torch.Tensor | None,
           binary: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Flatten to float64 on the predictions' device and check shapes, label values and weights."""
    p = _flat(preds)
    y = _flat(labels).to(p.device)
    if y.shape != p.shape:
        raise ValueError(f"labels have {y.numel()} values but predictions have {p.numel()}")
    if binary and y.numel() and not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("binary labels must be 0 or 1; got other values (is this a continuous task?)")
    w = None
    if weights is not None:
        w = _flat(weights).to(p.device)
        if w.shape != p.shape:
            raise ValueError(f"weights have {w.numel()} values but predictions have {p.numel()}")
        if w.numel() and not bool((w >= 0).all() & torch.isfinite(w).all()):
            raise ValueError("weights must be finite and non-negative")
    return y, p, w


def _check_probs(p: torch.Tensor, what: str) -> None:
    if p.numel() and not bool(((p >= 0) & (p <= 1)).all()):
        raise ValueError(f"{what} expects probabilities in [0, 1]; got values in [{float(p.min()):.4g}, "
                         f"{float(p.max()):.4g}] (apply the sampling correction and a sigmoid to logits first)")


def _mean(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    return x.mean() if w is None else (w * x).sum() / w.sum()


def _weighted_auc(y: torch.Tensor, s: torch.Tensor, w: torch.Tensor) -> float:
    """Weighted AUC by grouping equal scores: each positive beats every negative of a lower score and half-beats
    the negatives of its own score (weights multiply the pair counts)."""
    _, group = torch.unique(s, return_inverse=True)  # group = dense rank of the score, ties share one
    k = int(group.max()) + 1
    pos = torch.bincount(group, weights=w * y, minlength=k)
    neg = torch.bincount(group, weights=w * (1 - y), minlength=k)
    below = torch.cumsum(neg, 0) - neg
    denom = pos.sum() * neg.sum()
    return float((pos * (below + 0.5 * neg)).sum() / denom) if denom > 0 else float("nan")


def auc(labels: torch.Tensor, scores: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """ROC AUC of `scores` (probabilities, logits or any real score) for 0/1 `labels`; equal scores count one half.

    NaN when only one class (or no sample) is present. Non-finite scores are refused.
    """
    y, s, w = _check(labels, scores, weights, binary=True)
    if s.numel() and not bool(torch.isfinite(s).all()):
        raise ValueError("auc: scores contain NaN or inf")
    if w is not None:
        return _weighted_auc(y, s, w) if y.numel() else float("nan")
    if y.numel() == 0 or bool(y.min() == y.max()):
        return float("nan")
    if bool((s.min() < 0) | (s.max() > 1)):
        # torchmetrics applies a sigmoid to scores outside [0, 1]; in float64 that saturates to exactly 1.0 above
        # ~37 (float32: ~17) and would turn distinct logits into ties. Dense ranks keep the order and the ties.
        _, rank = torch.unique(s, return_inverse=True)
        s = rank.double() / max(int(rank.max()), 1)
    return float(binary_auroc(s, y.long(), validate_args=False))


def paired_auc_se(y: np.ndarray, a: np.ndarray, b: np.ndarray, n: int = 200, seed: int = 0) -> float:
    """Bootstrap standard error of AUC(a) - AUC(b) on the same rows (labels `y`; rows resampled jointly, `n`
    resamples): the interval of a paired comparison, which is much tighter than two independent AUC errors because
    both models see the same hard rows. Vectorised: each resample is a row of counts, and one weighted AUC per
    score ordering (ties share rank). NaN for n < 2 or no rows."""
    if n < 2 or len(y) == 0:
        return float("nan")
    counts = bootstrap_counts(len(y), n, seed)
    return float(np.std(bootstrap_aucs(y, a, counts) - bootstrap_aucs(y, b, counts), ddof=1))


def bootstrap_counts(rows: int, n: int, seed: int = 0) -> np.ndarray:
    """[n, rows] counts of each row in each of `n` resamples with replacement: the weights `bootstrap_aucs` takes.
    Depends only on (rows, n, seed), so every comparison on the same rows can share one draw."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, rows, size=(n, rows))
    return np.bincount((draws + rows * np.arange(n)[:, None]).ravel(), minlength=n * rows).reshape(n, rows)


def bootstrap_aucs(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUC of scores `s` for labels `y` under each row of weights `w` [n, rows] (ties count one half)."""
    order = np.argsort(s, kind="stable")
    _, starts = np.unique(s[order], return_index=True)  # tie groups of the ascending scores
    pos, wo = y[order].astype(bool), w[:, order].astype(np.float64)
    wp = np.add.reduceat(np.where(pos, wo, 0.0), starts, axis=1)
    wn = np.add.reduceat(np.where(pos, 0.0, wo), starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn
    return (wp * (below + 0.5 * wn)).sum(1) / (wp.sum(1) * wn.sum(1))


def auc_standard_error(auc_value: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC measured on n_pos positives and n_neg negatives (Hanley & McNeil 1982). NaN when
    either count is 0 or the AUC is NaN."""
    a = auc_value
    if not n_pos or not n_neg or a != a:
        return float("nan")
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    return max(var, 0.0) ** 0.5


def bayes_auc(labels: torch.Tensor, p_true: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Bayes-optimal AUC on synthetic data: the AUC of the ground-truth probability against the sampled labels.
    No model can beat it in expectation; on a finite sample a model can exceed it by noise."""
    return auc(labels, p_true, weights)


def log_loss(labels: torch.Tensor, probs: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Mean binary cross-entropy (natural log) of probabilities `probs`; NaN for empty input."""
    y, p, w = _check(labels, probs, weights, binary=True)
    _check_probs(p, "log_loss")
    if p.numel() == 0:
        return float("nan")
    p = p.clamp(_EPS, 1 - _EPS)
    return float(_mean(-(y * p.log() + (1 - y) * (1 - p).log()), w))


def ne(labels: torch.Tensor, probs: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Normalized entropy: the mean log loss divided by the entropy of the label base rate.

    Lower is better; 1.0 is what always predicting the base rate scores. NaN when the base rate is 0 or 1 (the
    normaliser is zero) or the input is empty.
    """
    y, p, w = _check(labels, probs, weights, binary=True)
    _check_probs(p, "ne")
    if y.numel() == 0:
        return float("nan")
    base = float(_mean(y, w))
    if not 0.0 < base < 1.0:
        return float("nan")
    entropy = -(base * math.log(base) + (1 - base) * math.log(1 - base))
    return log_loss(y, p, w) / entropy


def calibration(labels: torch.Tensor, probs: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Sum of predictions over sum of labels (1.0 is calibrated; > 1 over-predicts). NaN when no label is
    positive."""
    y, p, w = _check(labels, probs, weights, binary=False)
    if w is not None:
        y, p = y * w, p * w
    total = float(y.sum())
    return float(p.sum()) / total if total else float("nan")


def mse(targets: torch.Tensor, preds: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Mean squared error; NaN for empty input."""
    y, p, w = _check(targets, preds, weights, binary=False)
    return float(_mean((p - y) ** 2, w)) if y.numel() else float("nan")


def relative_mse(targets: torch.Tensor, preds: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """MSE divided by the variance of the targets (= 1 - R²): the continuous-task analogue of NE, 1.0 being what
    always predicting the target mean scores. NaN when the targets are constant."""
    y, p, w = _check(targets, preds, weights, binary=False)
    if y.numel() == 0:
        return float("nan")
    var = float(_mean((y - _mean(y, w)) ** 2, w))
    return float(_mean((p - y) ** 2, w)) / var if var > 0 else float("nan")


def absolute_gain(value: float, base: float) -> float:
    """Absolute difference `value - base` (for AUC: 'AUC points', e.g. 0.0012 = +0.12 pt)."""
    return value - base


def relative_gain(value: float, base: float) -> float:
    """Relative change of `value` over `base`: (value - base) / base. NaN when base is 0. For AUC positive is
    better; for NE (lower is better) a negative relative change is an improvement."""
    return (value - base) / base if base else float("nan")


def component_capture(probs: torch.Tensor, components: dict[str, torch.Tensor]) -> dict[str, float]:
    """How much of each known part of the true logit a model's predictions follow (synthetic data only).

    Least squares of the model's logit (of its true-space probability) on the ground-truth logit components
    (`SyntheticWorld.ctr_components`; constant ones are skipped) plus an intercept: a coefficient of 1 means the
    model's logit moves one-for-one with that part of the truth, 0 that the model does not see it at all (the
    components are nearly independent, so each coefficient reads alone). Also returns 'r2', the share of the
    model logit's variance the components explain. Used by the teacher scaling benchmark to tell *which* part of
    the world an extra model size, history or data bought.
    """
    _check_probs(probs, "probs")
    p = _flat(probs).double().clamp(_EPS, 1 - _EPS)
    z = torch.log(p) - torch.log1p(-p)
    bad = {k: _flat(v).numel() for k, v in components.items() if _flat(v).numel() != z.numel()}
    if bad:
        raise ValueError(f"components {bad} (rows) do not match the {z.numel()} predictions")
    names = [k for k, v in components.items() if float(_flat(v).double().std()) > 0]
    if not names or z.numel() <= len(names) + 1:
        return {**{k: float("nan") for k in components}, "r2": float("nan")}
    x = torch.stack([_flat(components[k]).double() for k in names] + [torch.ones_like(z)], 1)
    coef = torch.linalg.lstsq(x, z.unsqueeze(1)).solution.squeeze(1)
    resid = z - x @ coef
    out = {k: float("nan") for k in components} | {k: float(c) for k, c in zip(names, coef[:-1], strict=True)}
    return out | {"r2": float(1 - resid.var() / z.var()) if float(z.var()) > 0 else float("nan")}


def transferability(auc_distilled: float, auc_base: float, auc_teacher: float, *, min_gain: float = 0.0,
                    strict: bool = False) -> float:
    """Share of the teacher's AUC gain that the distilled student keeps:
    ``(AUC_distilled - AUC_base) / (AUC_teacher - AUC_base)``.

    1.0: the student gained as much over its base as the teacher has over it; 0: distillation did nothing;
    negative: distillation hurt. Undefined when the teacher does not beat the base model by more than
    `min_gain` (the denominator is zero, negative or noise: the ratio would flip sign or explode) or an input is
    NaN: then it returns NaN and emits a RuntimeWarning naming the reason, or raises ValueError when `strict`.
    """
    gain = auc_teacher - auc_base
    reason = None
    if any(math.isnan(v) for v in (auc_distilled, auc_base, auc_teacher)):
        reason = "an AUC is NaN"
    elif not gain > min_gain:
        reason = f"teacher AUC {auc_teacher:.6f} does not beat base AUC {auc_base:.6f} by more than {min_gain:g}"
    if reason is not None:
        if strict:
            raise ValueError(f"transferability undefined: {reason}")
        warnings.warn(f"transferability undefined (NaN): {reason}", RuntimeWarning, stacklevel=2)
        return float("nan")
    return (auc_distilled - auc_base) / gain


def compare(model: dict[str, float], base: dict[str, float], teacher: dict[str, float] | None = None,
            min_gain: float = 0.0) -> dict[str, float]:
    """Gains of one model's :func:`evaluate` output over a base model's, per task:
    ``auc_gain/T`` (absolute AUC difference), ``auc_rel_gain/T`` ((AUC - AUC_base) / AUC_base),
    ``ne_rel_change/T`` ((NE - NE_base) / NE_base, negative is better), and with the teacher's metrics
    ``transferability/T`` (`model` being the distilled student; NaN where undefined, see :func:`transferability`).
    """
    out: dict[str, float] = {}
    for key, value in model.items():
        kind, _, task = key.partition("/")
        if key not in base:
            continue
        if kind == "auc":
            out[f"auc_gain/{task}"] = absolute_gain(value, base[key])
            out[f"auc_rel_gain/{task}"] = relative_gain(value, base[key])
            if teacher is not None and key in teacher:
                out[f"transferability/{task}"] = transferability(value, base[key], teacher[key], min_gain=min_gain)
        elif kind == "ne":
            out[f"ne_rel_change/{task}"] = relative_gain(value, base[key])
    return out


def evaluate(labels: dict[str, torch.Tensor], preds: dict[str, torch.Tensor], kinds: dict[str, str],
             p_true: dict[str, torch.Tensor] | None = None,
             weights: torch.Tensor | dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Per-task metrics as a flat dict of namespaced keys.

    `preds[T]` is a true-space probability for binary tasks, a value for continuous ones (`kinds[T]` is 'binary'
    or 'continuous'). Binary: ``auc/T``, ``ne/T``, ``calibration/T``; continuous: ``mse/T``, ``relative_mse/T``.
    With ground truth `p_true[T]` (synthetic data): ``bayes_auc/T`` and ``bayes_ne/T`` (binary) or ``bayes_mse/T``
    (continuous; `p_true` then holds the noiseless expected value). `weights` is one tensor for all tasks or one
    per task. Tasks missing from `preds` are skipped.
    """
    out: dict[str, float] = {}
    for task, y in labels.items():
        if task not in preds:
            continue
        p = preds[task]
        w = weights.get(task) if isinstance(weights, dict) else weights
        truth = p_true.get(task) if p_true is not None else None
        if kinds[task] == "binary":
            out[f"auc/{task}"] = auc(y, p, w)
            out[f"ne/{task}"] = ne(y, p, w)
            out[f"calibration/{task}"] = calibration(y, p, w)
            if truth is not None:
                out[f"bayes_auc/{task}"] = bayes_auc(y, truth, w)
                out[f"bayes_ne/{task}"] = ne(y, truth, w)
        elif kinds[task] == "continuous":
            out[f"mse/{task}"] = mse(y, p, w)
            out[f"relative_mse/{task}"] = relative_mse(y, p, w)
            if truth is not None:
                out[f"bayes_mse/{task}"] = mse(y, truth, w)
        else:
            raise ValueError(f"task {task!r}: unknown kind {kinds[task]!r} (expected 'binary' or 'continuous')")
    return out


class StreamingMetrics:
    """Accumulates batches and computes :func:`evaluate` over everything seen (cumulative) or over the last
    `window` samples of each task (a sliding window, for streaming AUC in training logs).

    `update` keeps detached references on the tensors' own device and never copies to the host, so it adds no
    device synchronisation to a training step; the copy and the metric computation happen in `compute`.
    """

    _FIELDS = ("labels", "preds", "p_true", "weights")

    def __init__(self, kinds: dict[str, str], window: int | None = None) -> None:
        if window is not None and window <= 0:
            raise ValueError(f"window must be positive or None, got {window}")
        self.kinds, self.window = dict(kinds), window
        self._parts: dict[str, list[dict[str, torch.Tensor]]] = {t: [] for t in self.kinds}
        self._n: dict[str, int] = dict.fromkeys(self.kinds, 0)

    def update(self, labels: dict[str, torch.Tensor], preds: dict[str, torch.Tensor],
               p_true: dict[str, torch.Tensor] | None = None, weights: torch.Tensor | None = None) -> None:
        """Add one batch: labels and predictions per task (as for :func:`evaluate`), optional ground truth and
        per-sample weights. Tasks absent from `labels` or `preds` are skipped for this batch."""
        for t in self.kinds:
            if t not in labels or t not in preds:
                continue
            part = {"labels": labels[t].detach().flatten(), "preds": preds[t].detach().flatten()}
            if p_true is not None and t in p_true:
                part["p_true"] = p_true[t].detach().flatten()
            if weights is not None:
                part["weights"] = weights.detach().flatten()
            self._parts[t].append(part)
            self._n[t] += part["labels"].numel()
            # Drop whole old batches while the rest still covers the window; compute() trims the remainder.
            while self.window is not None and self._n[t] - self._parts[t][0]["labels"].numel() >= self.window:
                self._n[t] -= self._parts[t].pop(0)["labels"].numel()

    def num_samples(self, task: str) -> int:
        """Samples held for `task` (at least the window when one is set and that many were seen)."""
        return min(self._n[task], self.window) if self.window is not None else self._n[task]

    def compute(self) -> dict[str, float]:
        """Metrics over the samples held (all, or the last `window` per task); {} before any update."""
        cat: dict[str, dict[str, torch.Tensor]] = {f: {} for f in self._FIELDS}
        for t, parts in self._parts.items():
            for f in self._FIELDS:
                # A field counts only if every batch held has it (e.g. p_true on synthetic data only).
                if parts and all(f in p for p in parts):
                    v = torch.cat([p[f] for p in parts]).cpu()
                    cat[f][t] = v[-self.window:] if self.window is not None else v
        return evaluate(cat["labels"], cat["preds"], self.kinds, p_true=cat["p_true"] or None,
                        weights=cat["weights"] or None)

    def reset(self) -> None:
        """Forget everything."""
        for t in self.kinds:
            self._parts[t].clear()
            self._n[t] = 0
