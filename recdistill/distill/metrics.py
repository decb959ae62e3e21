"""Evaluation metrics (DESIGN §1 'Measurement').

Conventions: predictions passed here are *true-space probabilities* for binary tasks (the model's logit with its
own sampling correction applied, then a sigmoid) and predicted values for continuous tasks. AUC comes from
torchmetrics (ties count one half); NE and calibration are written here and tested against hand counts.
"""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.classification import binary_auroc

_EPS = 1e-7


def auc(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """ROC AUC of `scores` for 0/1 `labels` (ties count 1/2). NaN when only one class is present."""
    y = labels.detach().flatten().to(torch.long).cpu()
    if y.numel() == 0 or int(y.min()) == int(y.max()):
        return float("nan")
    return float(binary_auroc(scores.detach().flatten().float().cpu(), y))


def ne(labels: torch.Tensor, probs: torch.Tensor) -> float:
    """Normalized entropy: mean log loss divided by the entropy of the label base rate (lower is better; 1.0 is
    what always predicting the base rate scores). NaN when the base rate is 0 or 1."""
    y = labels.detach().flatten().double().cpu()
    p = probs.detach().flatten().double().cpu().clamp(_EPS, 1 - _EPS)
    base = float(y.mean())
    if base <= 0.0 or base >= 1.0:
        return float("nan")
    logloss = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    return float(logloss / -(base * math.log(base) + (1 - base) * math.log(1 - base)))


def calibration(labels: torch.Tensor, probs: torch.Tensor) -> float:
    """Sum of predictions over sum of labels (1.0 is calibrated)."""
    total = float(labels.detach().double().sum())
    return float(probs.detach().double().sum()) / total if total else float("nan")


def mse(targets: torch.Tensor, preds: torch.Tensor) -> float:
    """Mean squared error."""
    return float(((preds.detach().double() - targets.detach().double()) ** 2).mean())


def relative_gain(value: float, base: float) -> float:
    """Relative improvement of `value` over `base`: (value - base) / base."""
    return (value - base) / base if base else float("nan")


def transferability(auc_distilled: float, auc_base: float, auc_teacher: float) -> float:
    """Share of the teacher's AUC gain that the distilled student keeps:
    (AUC_distilled - AUC_base) / (AUC_teacher - AUC_base).

    Undefined (NaN) when the teacher does not beat the base model (denominator <= 0): there is no gain to transfer,
    and a ratio would flip sign or explode.
    """
    gain = auc_teacher - auc_base
    if not gain > 0:
        return float("nan")
    return (auc_distilled - auc_base) / gain


def evaluate(labels: dict[str, torch.Tensor], preds: dict[str, torch.Tensor], kinds: dict[str, str],
             p_true: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Per-task metrics as a flat dict: auc/T, ne/T, calibration/T (binary), mse/T (continuous), and with ground
    truth bayes_auc/T (the AUC of the true probability: the ceiling for any model) and bayes_ne/T."""
    out: dict[str, float] = {}
    for task, y in labels.items():
        if task not in preds:
            continue
        p = preds[task]
        if kinds[task] == "binary":
            out[f"auc/{task}"] = auc(y, p)
            out[f"ne/{task}"] = ne(y, p)
            out[f"calibration/{task}"] = calibration(y, p)
            if p_true is not None and task in p_true:
                out[f"bayes_auc/{task}"] = auc(y, p_true[task])
                out[f"bayes_ne/{task}"] = ne(y, p_true[task])
        else:
            out[f"mse/{task}"] = mse(y, p)
            if p_true is not None and task in p_true:
                out[f"bayes_mse/{task}"] = mse(y, p_true[task])
    return out


class StreamingMetrics:
    """Accumulates (labels, predictions) over steps and computes :func:`evaluate` on everything seen, or on the last
    `window` samples per task when `window` is set (a sliding window for streaming AUC in training logs)."""

    def __init__(self, kinds: dict[str, str], window: int | None = None) -> None:
        self.kinds, self.window = kinds, window
        self._y: dict[str, list[torch.Tensor]] = {t: [] for t in kinds}
        self._p: dict[str, list[torch.Tensor]] = {t: [] for t in kinds}
        self._n: dict[str, int] = dict.fromkeys(kinds, 0)

    def update(self, labels: dict[str, torch.Tensor], preds: dict[str, torch.Tensor]) -> None:
        """Add one batch (tensors may live on any device; they are moved to CPU without grad)."""
        for t in self.kinds:
            if t in labels and t in preds:
                self._y[t].append(labels[t].detach().flatten().cpu())
                self._p[t].append(preds[t].detach().flatten().float().cpu())
                self._n[t] += labels[t].numel()
                while self.window is not None and self._n[t] - self._y[t][0].numel() >= self.window:
                    self._n[t] -= self._y[t].pop(0).numel()
                    self._p[t].pop(0)

    def compute(self) -> dict[str, float]:
        """Metrics over the samples held (all, or the window)."""
        ys = {t: torch.cat(v)[-self.window:] if self.window else torch.cat(v) for t, v in self._y.items() if v}
        ps = {t: torch.cat(v)[-self.window:] if self.window else torch.cat(v) for t, v in self._p.items() if v}
        return evaluate(ys, ps, self.kinds)

    def reset(self) -> None:
        """Forget everything."""
        for t in self.kinds:
            self._y[t].clear()
            self._p[t].clear()
            self._n[t] = 0
