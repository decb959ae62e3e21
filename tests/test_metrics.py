"""Metrics against exact hand counts on small data, and the streaming accumulator against one-shot evaluation."""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recdistill.distill.metrics import (
    StreamingMetrics,
    auc,
    auc_standard_error,
    bayes_auc,
    bootstrap_aucs,
    calibration,
    compare,
    evaluate,
    log_loss,
    mse,
    ne,
    paired_auc_se,
    relative_gain,
    relative_mse,
    transferability,
)


def pair_count_auc(y, s, w=None):
    """AUC by explicit pair counting: P(score_pos > score_neg) + 1/2 P(tie), each pair weighted w_pos * w_neg."""
    w = w or [1.0] * len(y)
    pos = [(b, c) for a, b, c in zip(y, s, w, strict=True) if a == 1]
    neg = [(b, c) for a, b, c in zip(y, s, w, strict=True) if a == 0]
    wins = sum(wp * wn * (1.0 if p > n else 0.5 if p == n else 0.0) for (p, wp), (n, wn) in itertools.product(pos, neg))
    return wins / (sum(c for _, c in pos) * sum(c for _, c in neg))


def test_auc_exact_with_ties():
    y = [0, 0, 1, 1, 1]
    s = [0.1, 0.5, 0.5, 0.9, 0.2]
    # pairs (pos, neg): 0.5>0.1, 0.5=0.5 (half), 0.9>both, 0.2>0.1, 0.2<0.5 -> 4.5 of 6
    assert auc(torch.tensor(y), torch.tensor(s)) == pytest.approx(4.5 / 6)
    assert auc(torch.tensor(y), torch.tensor(s), weights=torch.ones(5)) == pytest.approx(4.5 / 6)


@pytest.mark.parametrize("seed", range(4))
def test_auc_matches_pair_count_on_random_data(seed):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(60, generator=g) < 0.4).long()
    s = torch.randint(0, 8, (60,), generator=g).float() / 8  # many ties on purpose
    # torchmetrics returns float32: 1e-6 is its rounding, far below the 1e-3 AUC differences that matter here
    assert auc(y, s) == pytest.approx(pair_count_auc(y.tolist(), s.tolist()), abs=1e-6)


def test_auc_of_large_logits_does_not_saturate():
    # torchmetrics would squash these through a sigmoid (all exactly 1.0 in float32) and report 0.5
    y = torch.tensor([0, 1, 1, 0, 1])
    s = torch.tensor([40.0, 50.0, 60.0, -45.0, 40.0])
    assert auc(y, s) == pytest.approx(pair_count_auc(y.tolist(), s.tolist()), abs=1e-6) == 11 / 12


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(-3, 3), st.floats(0.0, 5.0)), min_size=2, max_size=25))
def test_weighted_auc_matches_weighted_pair_count(rows):
    y, s, w = (list(c) for c in zip(*rows, strict=True))
    expected = pair_count_auc(y, s, w) if sum(wi for yi, wi in zip(y, w, strict=True) if yi == 1) * sum(
        wi for yi, wi in zip(y, w, strict=True) if yi == 0) > 0 else float("nan")
    got = auc(torch.tensor(y), torch.tensor(s), torch.tensor(w, dtype=torch.float64))
    assert got == pytest.approx(expected, abs=1e-9, nan_ok=True)


def test_integer_weights_equal_repeated_rows():
    g = torch.Generator().manual_seed(3)
    y = (torch.rand(40, generator=g) < 0.5).long()
    s = torch.randint(0, 5, (40,), generator=g).double()
    w = torch.randint(0, 4, (40,), generator=g)
    rep = torch.repeat_interleave(torch.arange(40), w)
    assert auc(y, s, w) == pytest.approx(auc(y[rep], s[rep]), abs=1e-6)  # hand-written vs torchmetrics (float32)
    p = torch.rand(40, generator=g, dtype=torch.float64)
    assert ne(y, p, w) == pytest.approx(ne(y[rep], p[rep]), rel=1e-12)
    assert calibration(y, p, w) == pytest.approx(calibration(y[rep], p[rep]), rel=1e-12)


def test_degenerate_and_invalid_inputs():
    assert math.isnan(auc(torch.zeros(4), torch.rand(4)))
    assert math.isnan(auc(torch.zeros(0), torch.zeros(0)))
    assert math.isnan(auc(torch.tensor([0, 1]), torch.tensor([0.2, 0.8]), torch.tensor([1.0, 0.0])))
    with pytest.raises(ValueError, match="0 or 1"):
        auc(torch.tensor([0.0, 0.5]), torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="3 values"):
        auc(torch.tensor([0, 1, 1]), torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="NaN"):
        auc(torch.tensor([0, 1]), torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match="probabilities"):
        ne(torch.tensor([0, 1]), torch.tensor([-2.0, 3.0]))  # logits passed by mistake
    with pytest.raises(ValueError, match="non-negative"):
        calibration(torch.tensor([0, 1]), torch.tensor([0.1, 0.2]), torch.tensor([1.0, -1.0]))


def test_ne_exact():
    y = torch.tensor([1.0, 0.0, 0.0, 1.0])
    p = torch.tensor([0.8, 0.3, 0.1, 0.6], dtype=torch.float64)  # float64: the hand count is exact
    logloss = -(math.log(0.8) + math.log(0.7) + math.log(0.9) + math.log(0.6)) / 4
    assert log_loss(y, p) == pytest.approx(logloss, rel=1e-12)
    assert ne(y, p) == pytest.approx(logloss / math.log(2), rel=1e-12)  # base rate 0.5: entropy log 2
    # base rate 1/4 and weights: weighted base rate (2*1) / (2+1+1+1... ) computed by hand
    y2, p2, w2 = torch.tensor([1, 0, 0, 0]), torch.tensor([0.5, 0.2, 0.2, 0.4]), torch.tensor([2.0, 1.0, 1.0, 1.0])
    base = 2 / 5
    ll = -(2 * math.log(0.5) + 2 * math.log(0.8) + math.log(0.6)) / 5
    assert ne(y2, p2, w2) == pytest.approx(ll / -(base * math.log(base) + (1 - base) * math.log(1 - base)), rel=1e-6)
    # predicting the base rate everywhere scores exactly 1
    assert ne(y, torch.full((4,), 0.5)) == pytest.approx(1.0)
    assert math.isnan(ne(torch.ones(3), torch.full((3,), 0.9)))


def test_calibration_mse_gain_transferability():
    assert calibration(torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0.5, 0.25, 0.5, 0.25])) == pytest.approx(0.75)
    assert math.isnan(calibration(torch.zeros(2), torch.tensor([0.1, 0.2])))
    t, p = torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([1.0, 3.0, 3.0, 4.0])
    assert mse(t, p) == pytest.approx(5 / 4)
    assert relative_mse(t, p) == pytest.approx((5 / 4) / 3.5)  # target mean 3, variance (4+1+0+9)/4
    assert relative_mse(t, torch.full((4,), 3.0)) == pytest.approx(1.0)
    assert relative_gain(0.77, 0.70) == pytest.approx(0.1)
    assert transferability(0.74, 0.70, 0.78) == pytest.approx(0.5)
    assert transferability(0.69, 0.70, 0.78) == pytest.approx(-0.125)


def test_transferability_undefined_is_nan_with_reason_or_raises():
    for teacher in (0.70, 0.65):
        with pytest.warns(RuntimeWarning, match="does not beat base"):
            assert math.isnan(transferability(0.74, 0.70, teacher))
        with pytest.raises(ValueError, match="does not beat base"):
            transferability(0.74, 0.70, teacher, strict=True)
    with pytest.warns(RuntimeWarning, match="by more than 0.01"):
        assert math.isnan(transferability(0.74, 0.70, 0.705, min_gain=0.01))  # gain within noise
    with pytest.warns(RuntimeWarning, match="NaN"):
        assert math.isnan(transferability(float("nan"), 0.70, 0.78))


def test_compare_gains():
    base = {"auc/ctr": 0.70, "ne/ctr": 0.90, "auc/cvr": 0.60, "mse/wt": 2.0}
    teacher = {"auc/ctr": 0.78, "ne/ctr": 0.80}
    student = {"auc/ctr": 0.74, "ne/ctr": 0.81, "auc/cvr": 0.63, "mse/wt": 1.0}
    out = compare(student, base, teacher)
    assert set(out) == {"auc_gain/ctr", "auc_rel_gain/ctr", "transferability/ctr", "ne_rel_change/ctr",
                        "auc_gain/cvr", "auc_rel_gain/cvr"}
    assert out["auc_gain/ctr"] == pytest.approx(0.04)
    assert out["auc_rel_gain/cvr"] == pytest.approx(0.05)
    assert out["transferability/ctr"] == pytest.approx(0.5)
    assert out["ne_rel_change/ctr"] == pytest.approx(-0.1)


def test_evaluate_keys_and_bayes():
    g = torch.Generator().manual_seed(0)
    p_true = torch.rand(2000, generator=g)
    y = (torch.rand(2000, generator=g) < p_true).float()
    wt = torch.rand(2000, generator=g) * 3
    out = evaluate({"ctr": y, "wt": wt}, {"ctr": p_true * 0.5, "wt": wt + 1.0}, {"ctr": "binary", "wt": "continuous"},
                   p_true={"ctr": p_true, "wt": wt})
    assert set(out) == {"auc/ctr", "ne/ctr", "calibration/ctr", "bayes_auc/ctr", "bayes_ne/ctr", "mse/wt",
                        "relative_mse/wt", "bayes_mse/wt"}
    assert out["bayes_auc/ctr"] == bayes_auc(y, p_true) > 0.7
    assert out["auc/ctr"] == pytest.approx(out["bayes_auc/ctr"])  # AUC is invariant to scaling
    assert out["ne/ctr"] > out["bayes_ne/ctr"]  # but the scaled prediction is miscalibrated
    assert out["calibration/ctr"] == pytest.approx(float(p_true.sum() * 0.5 / y.sum()))
    assert out["mse/wt"] == pytest.approx(1.0) and out["bayes_mse/wt"] == 0.0
    with pytest.raises(ValueError, match="unknown kind"):
        evaluate({"x": y}, {"x": y}, {"x": "ordinal"})


def test_streaming_equals_one_shot_and_window():
    g = torch.Generator().manual_seed(1)
    kinds = {"ctr": "binary", "wt": "continuous"}
    ys = [(torch.rand(100, generator=g) < 0.3).float() for _ in range(5)]
    ps = [torch.rand(100, generator=g) for _ in range(5)]
    ts = [torch.rand(100, generator=g) for _ in range(5)]
    ws = [torch.rand(100, generator=g) for _ in range(5)]
    full, win = StreamingMetrics(kinds), StreamingMetrics(kinds, window=150)  # window not on a batch boundary
    for y, p, t, w in zip(ys, ps, ts, ws, strict=True):
        full.update({"ctr": y, "wt": p}, {"ctr": p, "wt": t}, p_true={"ctr": t}, weights=w)
        win.update({"ctr": y, "wt": p}, {"ctr": p, "wt": t})
    cat = torch.cat
    one_shot = evaluate({"ctr": cat(ys), "wt": cat(ps)}, {"ctr": cat(ps), "wt": cat(ts)}, kinds,
                        p_true={"ctr": cat(ts)}, weights=cat(ws))
    assert full.compute() == pytest.approx(one_shot) and "bayes_auc/ctr" in one_shot
    last = {"ctr": cat(ys)[-150:], "wt": cat(ps)[-150:]}
    assert win.compute() == pytest.approx(evaluate(last, {"ctr": cat(ps)[-150:], "wt": cat(ts)[-150:]}, kinds))
    assert win.num_samples("ctr") == 150 and full.num_samples("ctr") == 500
    full.reset()
    assert full.compute() == {}


def test_auc_standard_error_matches_the_spread_of_repeated_measurements():
    """Hanley-McNeil against simulation: 1,000 draws of 40 positives / 160 negatives with exponential scores (the
    model the formula is derived under; positives at rate 1, negatives at rate 3: AUC 0.75)."""
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.ones(40), torch.zeros(160)])
    rate = torch.where(y > 0, 1.0, 3.0)
    aucs = [auc(y, -torch.log(torch.rand(200, generator=g)) / rate) for _ in range(1000)]
    mean, sd = sum(aucs) / len(aucs), torch.tensor(aucs).std().item()
    assert 0.70 < mean < 0.80
    assert auc_standard_error(mean, 40, 160) == pytest.approx(sd, rel=0.1)
    assert math.isnan(auc_standard_error(0.7, 0, 10)) and math.isnan(auc_standard_error(float("nan"), 5, 5))


def test_vectorised_bootstrap_auc_matches_the_weighted_auc():
    rng = np.random.default_rng(0)
    y = (rng.random(500) < 0.2).astype(np.float32)
    s = np.round(rng.random(500) + y * 0.5, 1)  # rounded: many ties
    w = rng.integers(0, 3, size=(4, 500))
    got = bootstrap_aucs(y, s, w)
    want = [auc(torch.from_numpy(y), torch.from_numpy(s), torch.from_numpy(wi.astype(np.float64))) for wi in w]
    assert np.allclose(got, want, atol=1e-9), (got, want)
    se = paired_auc_se(y, s, s + 0.1 * rng.random(500), 200)
    assert 0 < se < 0.05
    assert paired_auc_se(y, s, s, 200) == 0.0  # identical predictions: no difference to resample
