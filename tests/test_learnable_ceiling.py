"""The learnable-ceiling bench: its well-specified model recovers the world's own coefficients, scores below the
Bayes ceiling, and the bench writes its table (benchmarks/learnable_ceiling.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # robustness.py imports _common as a script does
sys.path.insert(0, str(ROOT))
from benchmarks import learnable_ceiling as lc  # noqa: E402
from recdistill.data.world import NUM_INTERESTS  # noqa: E402
from recdistill.distill.metrics import auc  # noqa: E402

#: Enough rows per parameter that the fit's coefficients are close to the world's: 2 dense features, few ids.
SMALL = ["data.num_days=4", "data.samples_per_day=20000", "data.history_len=256", "teacher.history_len=256",
         "data.world.num_users=300", "data.world.num_items=300", "data.world.num_dense=2"]


def test_the_well_specified_model_recovers_the_worlds_coefficients() -> None:
    cfg = lc.world_config("pairwise", False, SMALL)
    world = lc.build_source(cfg.data)
    view = cfg.sampling.teacher
    train = lc.concat([lc.window_rows(world, d, view, 256) for d in range(3)])
    evals = lc.window_rows(world, 3, None, 256)
    train["cand_llr"], evals["cand_llr"] = lc.candidate_llr(world, train, evals)
    model = lc.fit(world, train, num_days=3, l2=3.0, l2_day=10.0)
    w = world.w
    # the world's click logit: 0.3 dense_effects sin(2 x0) x1, and long_range * 1.2 * (1.5 or 0.8) for an interest
    # category (the active one unknown to any model: its mean over the three)
    assert abs(model.scalars[0].item() - 0.3 * w.dense_effects) < 0.12, model.scalars
    expected_interest = w.long_range * 1.2 * (1.5 + 0.8 * (NUM_INTERESTS - 1)) / NUM_INTERESTS
    assert abs(model.scalars[1].item() - expected_interest) < 0.35, model.scalars
    p = lc.score(model, world, evals, 2, view)
    y = torch.from_numpy(evals["label"])
    got, bayes = auc(y, torch.from_numpy(p)), auc(y, torch.from_numpy(evals["p_true"]))
    assert 0.7 < got < bayes, (got, bayes)
    # the view's sampling shift is taken out: the mean predicted CTR of the unsampled day is the observed one
    assert abs(p.mean() - evals["label"].mean()) < 0.1 * evals["label"].mean(), (p.mean(), evals["label"].mean())


def test_the_interest_posterior_separates_interest_categories(tmp_path: Path) -> None:
    cfg = lc.world_config("pairwise", False, SMALL)
    world = lc.build_source(cfg.data)
    rows = lc.window_rows(world, 1, None, 256)
    x = world._features(1, np.arange(world.num_rows(1)))  # latent state, to check the posterior against
    member = (x["interests"] == x["cat"][:, None]).any(1)
    llr = lc.interest_llr(rows, world)
    assert llr[member].mean() > llr[~member].mean() + 2.0
    assert auc(torch.from_numpy(member.astype(np.float64)), torch.from_numpy(llr)) > 0.9


def test_the_bench_writes_its_table(tmp_path: Path) -> None:
    out = tmp_path / "lc.json"
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"worlds": {"pairwise": {"result": {"tasks": {"ctr": {
        "bayes_auc": 0.5, "auc": {"baseline_lr": 0.6, "baseline_gbdt": 0.62, "teacher": 0.63}}}}}}}))
    res = lc.main(["--quick", "--only", "pairwise", "--suite", str(suite), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["table"][0]["world"] == "pairwise" and Path(res["plot"]).exists()
    ceil = saved["worlds"]["pairwise"]
    assert 0.5 < ceil["auc"] < ceil["bayes_auc"]
    row = saved["table"][0]
    assert row["headroom"] == ceil["auc"] - 0.62 and row["target_reachable"] == (ceil["auc"] >= 0.63)
    assert set(ceil["held_out_auc"]) == {f"{a:g}/{b:g}" for a, b in lc.L2_GRID}
    # --reuse: the same ceilings compared with another suite run, nothing fitted again
    suite.write_text(json.dumps({"worlds": {"pairwise": {"result": {"tasks": {"ctr": {
        "bayes_auc": 0.5, "auc": {"baseline_lr": 0.6, "baseline_gbdt": 0.61, "teacher": 0.65}}}}}}}))
    again = lc.main(["--quick", "--only", "pairwise", "--suite", str(suite), "--reuse", str(out),
                     "--out", str(tmp_path / "lc2.json")])
    assert again["worlds"]["pairwise"] == ceil and again["table"][0]["headroom"] == ceil["auc"] - 0.61
    assert again["table"][0]["teacher"] == 0.65
    with pytest.raises(SystemExit):
        lc.main(["--quick", "--only", "pairwise,short_history", "--reuse", str(out), "--out", str(tmp_path / "x")])
