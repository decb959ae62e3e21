"""Task and distillation losses (DESIGN §4 'Losses').

L_main = L_task; L_aux = L_task + beta * L_distill. Samples with no (finite) teacher signal contribute no
distillation loss. `beta: auto` keeps beta * L_distill at a configured ratio of L_task (running estimate).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def task_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], kinds: dict[str, str],
              continuous: Literal["mse", "log_mse"] = "mse") -> torch.Tensor:
    """Sum over tasks of BCE-with-logits (binary) or (log-)MSE (continuous; the head's output is the value, or
    log1p of it for log_mse)."""
    total = None
    for task, kind in kinds.items():
        y, out = labels[task].float(), logits[task]
        if kind == "binary":
            loss = F.binary_cross_entropy_with_logits(out, y)
        elif continuous == "log_mse":
            loss = F.mse_loss(out, torch.log1p(y.clamp(min=0)))
        else:
            loss = F.mse_loss(out, y)
        total = loss if total is None else total + loss
    if total is None:
        raise ValueError("task_loss: no tasks")
    return total


def valid_signal(teacher_logit: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """Mask of samples whose teacher signal exists and is finite (non-finite ones are rejected)."""
    return found & torch.isfinite(teacher_logit)


def distill_loss(target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, kind: Literal["ce", "mse"] = "ce",
                 temperature: float = 1.0) -> torch.Tensor:
    """Mean distillation loss over samples where `mask` is True (0 with a graph when none are).

    ce: soft-label binary cross-entropy between sigmoid(target / T) and pred / T, times T^2 so gradient magnitudes
    do not shrink with T (Hinton et al.); T=1 is the paper's CE. mse: squared logit difference.
    """
    if not bool(mask.any()):
        return pred.sum() * 0.0  # keeps the graph (and DDP-style hooks) consistent with no signal
    t = target[mask].detach()
    p = pred[mask]
    if kind == "mse":
        return F.mse_loss(p, t)
    soft = torch.sigmoid(t / temperature)
    return F.binary_cross_entropy_with_logits(p / temperature, soft) * temperature**2


def hint_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The representation hint (student.hint_weight): the share of the teacher representation's variance over
    the batch's `mask` rows [B] that the prediction `pred` [B, H] of `target` [B, H] leaves unexplained, i.e. the
    squared error over the summed variance of the target's columns: 1 for the batch mean, 0 for a perfect fit, so
    a weight means the same for any width or scale of the representation. 0 (with a graph) with fewer than two
    rows. Branch-free: no host sync per step on a device."""
    w = mask.to(pred.dtype).unsqueeze(1)
    n = w.sum()
    rows = n.clamp(min=1)
    mean = (target * w).sum(0) / rows
    var = ((target - mean) ** 2 * w).sum() / rows
    share = ((pred - target) ** 2 * w).sum() / rows / var.clamp(min=1e-12)
    return torch.where(n >= 2, share, pred.sum() * 0.0)


class AutoBeta:
    """beta for `beta: auto`: keeps beta * L_distill ≈ ratio * L_task using exponential moving averages of both
    magnitudes. The averages stay tensors on the losses' device (no host sync per step); the returned beta is
    detached, so it carries no gradient."""

    def __init__(self, ratio: float = 1.0, momentum: float = 0.98, eps: float = 1e-8) -> None:
        self.ratio, self.momentum, self.eps = ratio, momentum, eps
        self.task_avg: torch.Tensor | None = None
        self.distill_avg: torch.Tensor | None = None

    def __call__(self, l_task: torch.Tensor, l_distill: torch.Tensor) -> torch.Tensor:
        """Update the running magnitudes and return the current beta (a 0-dim tensor)."""
        lt, ld = l_task.detach(), l_distill.detach()
        m = self.momentum
        self.task_avg = lt if self.task_avg is None else m * self.task_avg + (1 - m) * lt
        self.distill_avg = ld if self.distill_avg is None else m * self.distill_avg + (1 - m) * ld
        return self.ratio * self.task_avg / self.distill_avg.clamp(min=self.eps)
