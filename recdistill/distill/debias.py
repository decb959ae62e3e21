"""Sampling-aware debias of teacher logits before distillation (DESIGN §4 'Sampling and debias').

A model trained on a view that keeps negatives with rate r and positives with q_eff[traffic] learns odds
multiplied by q_eff / r, so its (sampled-space) logit is the true-space logit + log q_eff - log r. The correction
back to the true space is ``g(z) = z + log r - log q_eff[traffic] + b`` (b: an extra calibrated bias), and
``g^-1(y) = y - (log r - log q_eff[traffic] + b)``. Teacher and student usually sample differently, so their raw
logits live in different spaces; the modes below say which space the distillation loss compares them in.

That shift holds for the task whose label decides the keep-rate (`SamplingConfig.task`, say ctr). A task *within*
it (TaskSpec.within: non-zero only where the sampling label is 1, as a conversion needs a click) is moved by a
factor that depends on the row instead: a kept row was kept with probability P(kept|x) = p_c q + (1 - p_c) r, and
its label is non-zero only among the q-kept positives, so E[y|x] = E_s[y|x] * (p_c + (1 - p_c) r / q), with p_c
the true-space probability of the sampling task. A constant logit shift gets the calibration of such a task wrong
(half the true conversion rate at the student's r = 0.1) and its ranking slightly wrong across rows whose p_c
differs. Other tasks get no correction.
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


def within_factor(p_by: torch.Tensor, cfg: SamplingConfig, traffic: torch.Tensor, num_traffic: int) -> torch.Tensor:
    """P(kept | x) / q_eff = p + (1 - p) r / q_eff[traffic], for true-space probabilities `p_by` of the sampling
    task: E[y|x] / E_s[y|x] for a task within it (module docstring)."""
    r_over_q = torch.exp(cfg.correction(traffic, num_traffic).to(p_by.dtype) - cfg.b)
    return p_by + (1.0 - p_by) * r_over_q


def distill_pair(mode: DebiasMode, z_teacher: torch.Tensor, z_student: torch.Tensor, traffic: torch.Tensor,
                 teacher: SamplingConfig, student: SamplingConfig, num_traffic: int,
                 z_teacher_by: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(target logit, prediction logit) compared by the distillation loss, for raw teacher / student logits [B].

    none:             z_t            vs  z_s             (ignores that the two were sampled differently)
    teacher_debiased: g_t(z_t)       vs  g_s(z_s)        (both in the true space)
    student_space:    g_s(z_t)       vs  g_s(z_s)        (the paper's Eq. 13-14: the student's correction on both)
    exact:            g_s^-1(g_t(z_t)) vs z_s            (teacher mapped into the student's sampled space)

    `z_teacher_by`: for a task within the sampling task, the teacher's raw logit of the sampling task; `exact`
    then maps through the true space with the within factor of each view (module docstring) instead of the
    shifts. The other modes use the shifts for every task, as the paper does.
    """
    if mode == "exact" and z_teacher_by is not None:
        p_by = torch.sigmoid(to_true(z_teacher_by.double(), teacher, traffic, num_traffic))
        p_true = torch.sigmoid(z_teacher.double()) * within_factor(p_by, teacher, traffic, num_traffic)
        p_student = (p_true / within_factor(p_by, student, traffic, num_traffic)).clamp(1e-7, 1 - 1e-7)
        return torch.logit(p_student).to(z_student.dtype), z_student
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
               num_traffic: int, continuous_loss: Literal["mse", "log_mse"] = "log_mse",
               within: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """A model's raw outputs per task -> what is evaluated, reported and served (DESIGN §4: always the true space).

    The sampling task (`view.task`): sigmoid(g(z)), g with `view`, the SamplingConfig the model was trained on. A
    task within it (`within` {task: sampling task}, TaskSpec.within): its sampled-space value (sigmoid(z) for a
    binary task, z for a continuous one: log1p of the value under log-MSE) times `within_factor` of the model's own
    sampling-task probability. Other tasks: no correction. Continuous values then come out of log space (expm1)
    when the head was trained with log-MSE. fp32 whatever the model's precision.
    """
    by = view.task
    p_by = torch.sigmoid(to_true(out[by].float(), view, traffic, num_traffic)) if by in out and \
        kinds.get(by) == "binary" else None
    res = {}
    for t, z in out.items():
        z = z.float()
        if t == by and p_by is not None:
            res[t] = p_by
            continue
        v = torch.sigmoid(z) if kinds[t] == "binary" else z
        if (within or {}).get(t) == by and p_by is not None:
            v = v * within_factor(p_by, view, traffic, num_traffic)
        res[t] = torch.expm1(v) if kinds[t] != "binary" and continuous_loss == "log_mse" else v
    return res


def within_of(tasks) -> dict[str, str]:  # noqa: ANN001 - TaskSpec-like objects (name, within)
    """{task: the task it is within} for the tasks that have one."""
    return {t.name: t.within for t in tasks if t.within}
