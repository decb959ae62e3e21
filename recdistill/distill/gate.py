"""Per-task distillation gate: a task whose teacher ranks the student's training labels worse than the student's
own served tower does gets no distillation loss until that changes.

The batch gate of the student trainer (student.signal_min_auc) throws away garbage; this one catches a teacher
that is real but weaker than the student on one task (a task the teacher was not built for, a broken head), where
distilling would pull the student down. Both sides are judged the same way: progressive validation over the last
`rows` training rows, the teacher's logit (out of sample: written before the teacher trained on the row) against
the student's main-tower logit computed in the same forward that trains on the row (before its update), both
mapped into the same space. A task closes when the teacher's AUC is more than `z` standard errors below the
student's, and opens again when it no longer is.
"""

from __future__ import annotations

import math

import torch

from recdistill.distill.metrics import auc, auc_standard_error


class _Window:
    """The last `size` (teacher, student, label) rows of one task."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.t = torch.empty(0, dtype=torch.float64)
        self.s = torch.empty(0, dtype=torch.float64)
        self.y = torch.empty(0, dtype=torch.float64)

    def add(self, t: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> None:
        self.t = torch.cat([self.t, t.double().cpu()])[-self.size:]
        self.s = torch.cat([self.s, s.double().cpu()])[-self.size:]
        self.y = torch.cat([self.y, y.double().cpu()])[-self.size:]


class TaskGate:
    """Keeps one window per task; `update` adds a batch's rows and says whether the task's distillation is on."""

    def __init__(self, tasks: list[str], rows: int = 4096, z: float = 2.0, min_class: int = 30) -> None:
        self.windows = {t: _Window(rows) for t in tasks}
        self.z, self.min_class = z, min_class
        self.open = {t: True for t in tasks}
        self.last: dict[str, tuple[float, float]] = {}  # task -> (teacher AUC, student AUC) at the last check

    def update(self, task: str, teacher: torch.Tensor, student: torch.Tensor, labels: torch.Tensor,
               mask: torch.Tensor) -> bool:
        """Add the `mask` rows of a batch (logits in one space, 0/1 labels) and return whether distillation of
        `task` is on for this batch. Open until both classes have `min_class` rows in the window."""
        w = self.windows[task]
        m = mask.bool()
        w.add(teacher.detach()[m], student.detach()[m], labels.detach()[m])
        n_pos = int((w.y > 0.5).sum())
        n_neg = len(w.y) - n_pos
        if min(n_pos, n_neg) < self.min_class:
            return self.open[task]
        a_t, a_s = auc(w.y, w.t), auc(w.y, w.s)
        se = math.hypot(auc_standard_error(a_t, n_pos, n_neg), auc_standard_error(a_s, n_pos, n_neg))
        self.last[task] = (a_t, a_s)
        self.open[task] = not (a_t < a_s - self.z * se)
        return self.open[task]
