"""Debias modes on constructed cases with known r, q, q_eff, b; the odds derivation checked by real sampling;
distillation / task losses and auto beta."""

import math

import numpy as np
import pytest
import torch

from recdistill.data.sampling import SamplingConfig, keep_mask
from recdistill.distill.debias import MODES, distill_pair, to_sampled, to_true, true_space, within_factor
from recdistill.distill.losses import AutoBeta, distill_loss, hint_loss, task_loss, valid_signal

TEACHER = SamplingConfig(name="t", r=0.5, q=1.0, b=0.0)
STUDENT = SamplingConfig(name="s", r=0.1, q=0.9, q_eff=[0.9, 0.5], b=0.2)


def logit(p):
    return math.log(p / (1 - p))


def test_each_mode_maps_teacher_logit_to_expected_value():
    zt, zs, traffic = torch.tensor([1.0, 1.0]), torch.tensor([-0.5, 0.25]), torch.tensor([0, 1])
    g_t = [1.0 + math.log(0.5)] * 2  # teacher: q = 1, b = 0
    c_s = [math.log(0.1) - math.log(0.9) + 0.2, math.log(0.1) - math.log(0.5) + 0.2]  # student, per traffic
    want = {
        "none": ([1.0, 1.0], [-0.5, 0.25]),
        "teacher_debiased": (g_t, [-0.5 + c_s[0], 0.25 + c_s[1]]),
        "student_space": ([1.0 + c_s[0], 1.0 + c_s[1]], [-0.5 + c_s[0], 0.25 + c_s[1]]),
        "exact": ([g_t[0] - c_s[0], g_t[1] - c_s[1]], [-0.5, 0.25]),
    }
    assert set(want) == set(MODES)
    for mode, (target, pred) in want.items():
        got_t, got_p = distill_pair(mode, zt, zs, traffic, TEACHER, STUDENT, num_traffic=2)
        torch.testing.assert_close(got_t, torch.tensor(target), msg=f"target, mode={mode}")
        torch.testing.assert_close(got_p, torch.tensor(pred), msg=f"prediction, mode={mode}")
    with pytest.raises(ValueError, match="unknown debias mode 'bogus'; allowed: none, teacher_debiased"):
        distill_pair("bogus", zt, zs, traffic, TEACHER, STUDENT, 2)


def test_true_space_corrects_binary_tasks_and_keeps_continuous_values():
    """What both trainers evaluate: sigmoid(g(z)) with the model's own view per traffic, continuous values as
    expm1 (log-MSE heads) or unchanged (MSE heads), fp32 also for a bf16 model."""
    z = {"ctr": torch.tensor([0.5, 0.5], dtype=torch.bfloat16), "watch": torch.tensor([1.0, 0.0])}
    kinds, traffic = {"ctr": "binary", "watch": "continuous"}, torch.tensor([0, 1])
    c_s = [math.log(0.1) - math.log(0.9) + 0.2, math.log(0.1) - math.log(0.5) + 0.2]
    got = true_space(z, kinds, STUDENT, traffic, num_traffic=2)
    assert got["ctr"].dtype == torch.float32
    torch.testing.assert_close(got["ctr"], torch.sigmoid(0.5 + torch.tensor(c_s)))
    torch.testing.assert_close(got["watch"], torch.tensor([math.e - 1, 0.0]))
    mse = true_space(z, kinds, STUDENT, traffic, num_traffic=2, continuous_loss="mse")
    torch.testing.assert_close(mse["watch"], z["watch"])


def test_exact_mode_moves_bayes_teacher_into_bayes_student_space():
    # With b = 0, the Bayes-optimal logit of a view is logit(p) + log q_eff - log r; "exact" must map the
    # teacher's one onto the student's one for every traffic source.
    s = STUDENT.model_copy(update={"b": 0.0})
    traffic = torch.tensor([0, 1, 1])
    p = torch.tensor([0.02, 0.3, 0.7], dtype=torch.float64)
    base = torch.log(p / (1 - p))
    q_s = torch.tensor([0.9, 0.5, 0.5], dtype=torch.float64)
    z_t = base + math.log(1.0) - math.log(0.5)
    target, _ = distill_pair("exact", z_t, z_t, traffic, TEACHER, s, 2)
    torch.testing.assert_close(target, base + torch.log(q_s) - math.log(0.1))
    torch.testing.assert_close(to_sampled(to_true(z_t, TEACHER, traffic, 2), TEACHER, traffic, 2), z_t)


def test_sampled_positive_rate_matches_the_odds_derivation():
    # Real keep/drop decisions over a population with a known positive rate: the positive rate among kept samples
    # must equal sigmoid(logit(p) + log q_eff - log r), i.e. g^-1 of the true logit.
    n, p = 600_000, 0.05
    rng = np.random.default_rng(0)
    pos = rng.random(n) < p
    traffic = rng.integers(0, 2, n)
    keep = keep_mask(np.arange(n), pos, traffic, STUDENT, 2)
    for t, q in enumerate([0.9, 0.5]):
        sel = keep & (traffic == t)
        rate = pos[sel].mean()
        expect = 1 / (1 + math.exp(-(logit(p) + math.log(q) - math.log(0.1))))
        assert abs(rate - expect) < 5 * math.sqrt(expect * (1 - expect) / sel.sum()), (t, rate, expect)


def test_a_task_within_the_sampling_task_is_mapped_by_the_within_factor():
    """Real keep/drop decisions by the click label over rows of different click rates: the conversion rate among
    kept rows is E[conv] / within_factor(p_click) (not a constant logit shift of it), and true_space recovers
    the true conversion probability from the Bayes model of the kept rows, binary and continuous alike."""
    s = STUDENT.model_copy(update={"b": 0.0})
    n = 1_200_000
    rng = np.random.default_rng(1)
    p_c = np.where(np.arange(n) % 2 == 0, 0.02, 0.4)  # two kinds of rows, far apart in click rate
    p_v_given_c = 0.3
    click = rng.random(n) < p_c
    conv = click & (rng.random(n) < p_v_given_c)
    traffic = rng.integers(0, 2, n)
    keep = keep_mask(np.arange(n), click, traffic, s, 2)
    for kind in (0, 1):
        for t, q in enumerate([0.9, 0.5]):
            sel = keep & (traffic == t) & (np.arange(n) % 2 == kind)
            pc = p_c[kind]
            expect = pc * p_v_given_c / (pc + (1 - pc) * 0.1 / q)
            rate = conv[sel].mean()
            assert abs(rate - expect) < 5 * math.sqrt(expect * (1 - expect) / sel.sum()), (kind, t, rate, expect)
    pc = torch.tensor([0.02, 0.4, 0.02, 0.4], dtype=torch.float64)
    tr = torch.tensor([0, 0, 1, 1])
    ps_v = pc * p_v_given_c / within_factor(pc, s, tr, 2)  # the kept rows' Bayes conversion rate
    z = {"ctr": to_sampled(torch.logit(pc), s, tr, 2), "cvr": torch.logit(ps_v), "wt": ps_v * 2.0}
    got = true_space(z, {"ctr": "binary", "cvr": "binary", "wt": "continuous"}, s, tr, 2, continuous_loss="mse",
                     within={"cvr": "ctr", "wt": "ctr"})
    torch.testing.assert_close(got["ctr"], pc.float())
    torch.testing.assert_close(got["cvr"], (pc * p_v_given_c).float())
    torch.testing.assert_close(got["wt"], (pc * p_v_given_c * 2.0).float())
    plain = true_space({k: z[k] for k in ("ctr", "cvr")}, {"ctr": "binary", "cvr": "binary"}, s, tr, 2)  # no within
    torch.testing.assert_close(plain["cvr"], ps_v.float())
    # exact distillation: the teacher's Bayes conversion logit of its kept rows -> the student's one
    zt_c = to_sampled(torch.logit(pc), TEACHER, tr, 2)
    zt_v = torch.logit(pc * p_v_given_c / within_factor(pc, TEACHER, tr, 2))
    target, _ = distill_pair("exact", zt_v, zt_v, tr, TEACHER, s, 2, z_teacher_by=zt_c)
    torch.testing.assert_close(target, torch.logit(ps_v))


def test_distill_ce_temperature_mask_and_rejects():
    target = torch.tensor([2.0, -1.0, float("nan"), 0.5])
    pred = torch.tensor([1.0, -1.0, 3.0, 0.0], requires_grad=True)
    found = torch.tensor([True, True, True, False])
    mask = valid_signal(target, found)
    assert mask.tolist() == [True, True, False, False]  # NaN rejected, missing skipped
    loss = distill_loss(target, pred, mask, "ce", temperature=1.0)
    soft = torch.sigmoid(torch.tensor([2.0, -1.0]))
    x = torch.tensor([1.0, -1.0])
    want = (-(soft * torch.nn.functional.logsigmoid(x) + (1 - soft) * torch.nn.functional.logsigmoid(-x))).mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert pred.grad[2] == 0 and pred.grad[3] == 0 and pred.grad[0] != 0
    # T = 2: targets and predictions are both divided by T, the loss is scaled by T^2.
    t2 = distill_loss(target, pred.detach(), mask, "ce", temperature=2.0)
    soft2 = torch.sigmoid(torch.tensor([1.0, -0.5]))
    x2 = x / 2
    logsig = torch.nn.functional.logsigmoid
    want2 = 4 * (-(soft2 * logsig(x2) + (1 - soft2) * logsig(-x2))).mean()
    torch.testing.assert_close(t2, want2)
    torch.testing.assert_close(distill_loss(target, pred.detach(), mask, "mse"), torch.tensor(0.5))


def test_no_signal_gives_zero_loss_with_graph():
    pred = torch.tensor([0.3, 0.1], requires_grad=True)
    loss = distill_loss(torch.zeros(2), pred, torch.zeros(2, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros(2))


def test_task_loss_kinds():
    logits = {"ctr": torch.tensor([0.0, 0.0]), "wt": torch.tensor([1.0, 2.0])}
    labels = {"ctr": torch.tensor([1.0, 0.0]), "wt": torch.tensor([1.0, 4.0])}
    kinds = {"ctr": "binary", "wt": "continuous"}
    torch.testing.assert_close(task_loss(logits, labels, kinds), torch.tensor(math.log(2) + 2.0))
    want_log = ((1 - math.log(2)) ** 2 + (2 - math.log(5)) ** 2) / 2
    torch.testing.assert_close(task_loss(logits, labels, kinds, "log_mse"), torch.tensor(math.log(2) + want_log))


def test_auto_beta_tracks_ratio():
    ab = AutoBeta(ratio=0.5, momentum=0.0)
    assert float(ab(torch.tensor(2.0), torch.tensor(0.5))) == pytest.approx(2.0)  # 0.5 * 2 / 0.5
    ab = AutoBeta(ratio=1.0, momentum=0.5)
    ab(torch.tensor(1.0), torch.tensor(1.0))
    beta = ab(torch.tensor(3.0), torch.tensor(1.0, requires_grad=True))
    assert float(beta) == pytest.approx(2.0) and not beta.requires_grad  # EMA task 2, distill 1


def test_hint_loss_is_the_unexplained_share_of_the_variance():
    g = torch.Generator().manual_seed(0)
    target = 3 * torch.randn(200, 4, generator=g) + 5
    mask = torch.ones(200, dtype=torch.bool)
    loss = hint_loss
    assert float(loss(target, target, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(target.mean(0).expand_as(target), target, mask)) == pytest.approx(1.0, rel=1e-5)
    # scale-free: the same share for a target ten times larger
    pred = target + torch.randn(200, 4, generator=g)
    assert float(loss(10 * pred, 10 * target, mask)) == pytest.approx(float(loss(pred, target, mask)), rel=1e-4)
    # masked rows count for nothing, whatever they hold; fewer than two rows: zero
    junk = pred.clone()
    junk[100:] = 1e6
    half = torch.arange(200) < 100
    assert float(loss(junk, target, half)) == pytest.approx(float(loss(pred[:100], target[:100], half[:100])))
    assert float(loss(pred, target, torch.arange(200) < 1)) == 0.0
    # without a host-side branch: the gradient of a one-row batch is zero and finite, not 0 * inf
    p = pred.clone().requires_grad_()
    loss(p, target, torch.arange(200) < 1).backward()
    assert torch.equal(p.grad, torch.zeros_like(p))
