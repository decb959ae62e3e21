"""Metrics against exact hand counts on small data, and the streaming accumulator against one-shot evaluation."""

import itertools
import math

import pytest
import torch

from recdistill.distill.metrics import (
    StreamingMetrics,
    auc,
    calibration,
    evaluate,
    ne,
    relative_gain,
    transferability,
)


def pair_count_auc(y, s):
    """AUC by explicit pair counting: P(score_pos > score_neg) + 1/2 P(tie)."""
    pos = [b for a, b in zip(y, s, strict=True) if a == 1]
    neg = [b for a, b in zip(y, s, strict=True) if a == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_exact_with_ties():
    y = [0, 0, 1, 1, 1]
    s = [0.1, 0.5, 0.5, 0.9, 0.2]
    assert auc(torch.tensor(y), torch.tensor(s)) == pytest.approx(4.5 / 6)


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pair_count_on_random_data(seed):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(60, generator=g) < 0.4).long()
    s = torch.randint(0, 8, (60,), generator=g).float() / 8  # many ties on purpose
    assert auc(y, s) == pytest.approx(pair_count_auc(y.tolist(), s.tolist()), abs=1e-6)


def test_auc_single_class_is_nan():
    assert math.isnan(auc(torch.zeros(4), torch.rand(4)))


def test_ne_exact():
    y = torch.tensor([1.0, 0.0, 0.0, 1.0])
    p = torch.tensor([0.8, 0.3, 0.1, 0.6], dtype=torch.float64)  # float64: the hand count is exact
    logloss = -(math.log(0.8) + math.log(0.7) + math.log(0.9) + math.log(0.6)) / 4
    base_entropy = math.log(2)  # base rate 0.5
    assert ne(y, p) == pytest.approx(logloss / base_entropy, rel=1e-9)
    # predicting the base rate everywhere scores exactly 1
    assert ne(y, torch.full((4,), 0.5)) == pytest.approx(1.0)
    assert math.isnan(ne(torch.ones(3), torch.full((3,), 0.9)))


def test_calibration_gain_transferability():
    assert calibration(torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0.5, 0.25, 0.5, 0.25])) == pytest.approx(0.75)
    assert relative_gain(0.77, 0.70) == pytest.approx(0.1)
    assert transferability(0.74, 0.70, 0.78) == pytest.approx(0.5)
    assert transferability(0.69, 0.70, 0.78) == pytest.approx(-0.125)
    assert math.isnan(transferability(0.74, 0.70, 0.70))  # teacher has no gain: undefined
    assert math.isnan(transferability(0.74, 0.70, 0.65))


def test_evaluate_keys_and_bayes():
    g = torch.Generator().manual_seed(0)
    p_true = torch.rand(2000, generator=g)
    y = (torch.rand(2000, generator=g) < p_true).float()
    wt = torch.rand(2000, generator=g) * 3
    out = evaluate({"ctr": y, "wt": wt}, {"ctr": p_true * 0.5, "wt": wt + 1.0}, {"ctr": "binary", "wt": "continuous"},
                   p_true={"ctr": p_true, "wt": wt})
    assert set(out) == {"auc/ctr", "ne/ctr", "calibration/ctr", "bayes_auc/ctr", "bayes_ne/ctr", "mse/wt",
                        "bayes_mse/wt"}
    assert out["auc/ctr"] == pytest.approx(out["bayes_auc/ctr"])  # AUC is invariant to scaling
    assert out["ne/ctr"] > out["bayes_ne/ctr"]  # but the scaled prediction is miscalibrated
    assert out["calibration/ctr"] == pytest.approx(float(p_true.sum() * 0.5 / y.sum()))
    assert out["mse/wt"] == pytest.approx(1.0) and out["bayes_mse/wt"] == 0.0


def test_streaming_equals_one_shot_and_window():
    g = torch.Generator().manual_seed(1)
    kinds = {"ctr": "binary"}
    ys = [(torch.rand(100, generator=g) < 0.3).float() for _ in range(5)]
    ps = [torch.rand(100, generator=g) for _ in range(5)]
    full, win = StreamingMetrics(kinds), StreamingMetrics(kinds, window=200)
    for y, p in zip(ys, ps, strict=True):
        full.update({"ctr": y}, {"ctr": p})
        win.update({"ctr": y}, {"ctr": p})
    assert full.compute() == pytest.approx(evaluate({"ctr": torch.cat(ys)}, {"ctr": torch.cat(ps)}, kinds))
    assert win.compute() == pytest.approx(evaluate({"ctr": torch.cat(ys[-2:])}, {"ctr": torch.cat(ps[-2:])}, kinds))
    full.reset()
    assert full.compute() == {}
