"""Per-task distillation gate: closes on a task whose teacher ranks labels worse than the student, stays open on a
task whose teacher is better, waits for enough rows, and opens again when the teacher recovers."""

import torch

from recdistill.distill.gate import TaskGate


def batches(n_batches: int, teacher_noise: float, student_noise: float, seed: int = 0, b: int = 128):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        score = torch.randn(b, generator=g)
        y = (torch.rand(b, generator=g) < torch.sigmoid(2 * score - 1)).float()
        yield (score + teacher_noise * torch.randn(b, generator=g), score + student_noise * torch.randn(b, generator=g),
               y, torch.ones(b, dtype=torch.bool))


def test_gate_closes_on_a_weaker_teacher_and_stays_open_on_a_stronger_one():
    gate = TaskGate(["ctr", "cvr"], rows=2048)
    assert gate.update("ctr", *next(batches(1, 5.0, 0.3, seed=0, b=40)))  # too few rows of each class to judge
    ctr = [gate.update("ctr", *x) for x in batches(40, teacher_noise=5.0, student_noise=0.3, seed=1)]
    cvr = [gate.update("cvr", *x) for x in batches(40, teacher_noise=0.3, student_noise=5.0, seed=2)]
    assert sum(ctr[-20:]) == 0
    assert all(cvr)
    a_t, a_s = gate.last["ctr"]
    assert a_t < a_s


def test_gate_reopens_when_the_teacher_recovers_and_ignores_masked_rows():
    gate = TaskGate(["ctr"], rows=1024)
    for x in batches(20, teacher_noise=5.0, student_noise=0.3, seed=3):
        gate.update("ctr", *x)
    assert not gate.open["ctr"]
    states = [gate.update("ctr", *x) for x in batches(20, teacher_noise=0.1, student_noise=0.3, seed=4)]
    assert states[-1]
    t, s, y, _ = next(batches(1, 5.0, 0.3, seed=5))  # garbage rows, all masked out: no effect
    assert gate.update("ctr", t, s, y, torch.zeros_like(y, dtype=torch.bool))
