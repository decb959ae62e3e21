"""Sampling-aware debias of teacher logits before distillation (DESIGN §4 'Sampling and debias').

A model trained on a view that keeps negatives with rate r and positives with q_eff[traffic] learns odds
multiplied by q_eff / r, so its (sampled-space) logit is the true-space logit + log q_eff - log r. The correction
back to the true space is ``g(z) = z + log r - log q_eff[traffic] + b`` (b: an extra calibrated bias), and
``g^-1(y) = y - (log r - log q_eff[traffic] + b)``. Teacher and student usually sample differently, so their raw
logits live in different spaces; the modes below say which space the distillation loss compares them in.
"""

from __future__ import annotations

from typing import Literal

import torch

from recdistill.config import SamplingConfig

DebiasMode = Literal["none", "teacher_debiased", "student_space", "exact"]
MODES: tuple[str, ...] = ("none", "teacher_debiased", "student_space", "exact")


def to_true(z: torch.Tensor, cfg: SamplingConfig, traffic: torch.Tensor, num_traffic: int) -> torch.Tensor:
    """g(z): sampled-space logit of a model trained on view `cfg` -> true-space logit."""
    return z + cfg.correction(traffic, num_traffic).to(z.dtype)


def to_sampled(y: torch.Tensor, cfg: SamplingConfig, traffic: torch.Tensor, num_traffic: int) -> torch.Tensor:
    """g^-1(y): true-space logit -> the sampled space of view `cfg`."""
    return y - cfg.correction(traffic, num_traffic).to(y.dtype)


def distill_pair(mode: DebiasMode, z_teacher: torch.Tensor, z_student: torch.Tensor, traffic: torch.Tensor,
                 teacher: SamplingConfig, student: SamplingConfig, num_traffic: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(target logit, prediction logit) compared by the distillation loss, for raw teacher / student logits [B].

    none:             z_t            vs  z_s             (ignores that the two were sampled differently)
    teacher_debiased: g_t(z_t)       vs  g_s(z_s)        (both in the true space)
    student_space:    g_s(z_t)       vs  g_s(z_s)        (the paper's Eq. 13-14: the student's correction on both)
    exact:            g_s^-1(g_t(z_t)) vs z_s            (teacher mapped into the student's sampled space)
    """
    if mode == "none":
        return z_teacher, z_student
    if mode == "teacher_debiased":
        return to_true(z_teacher, teacher, traffic, num_traffic), to_true(z_student, student, traffic, num_traffic)
    if mode == "student_space":
        return to_true(z_teacher, student, traffic, num_traffic), to_true(z_student, student, traffic, num_traffic)
    if mode == "exact":
        return to_sampled(to_true(z_teacher, teacher, traffic, num_traffic), student, traffic, num_traffic), z_student
    raise ValueError(f"unknown debias mode {mode!r}; allowed: {', '.join(MODES)}")


def true_space(out: dict[str, torch.Tensor], kinds: dict[str, str], view: SamplingConfig, traffic: torch.Tensor,
               num_traffic: int, continuous_loss: Literal["mse", "log_mse"] = "log_mse") -> dict[str, torch.Tensor]:
    """A model's raw outputs per task -> what is evaluated, reported and served (DESIGN §4: always the true space).

    Binary tasks: sigmoid(g(z)), g with `view`, the SamplingConfig the model was trained on. Continuous tasks are
    not down-sampled by label, so no correction: the value itself, expm1(z) when the head was trained with log-MSE
    (it predicts log1p of the value), z when trained with MSE. fp32 whatever the model's precision.
    """
    res = {}
    for t, z in out.items():
        z = z.float()
        if kinds[t] == "binary":
            res[t] = torch.sigmoid(to_true(z, view, traffic, num_traffic))
        else:
            res[t] = torch.expm1(z) if continuous_loss == "log_mse" else z
    return res
