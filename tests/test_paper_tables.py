"""benchmarks/paper_tables.py: its experiment configs load over the demo config, and a gain is called out only
where it clears both the seed spread and the paired bootstrap SE."""

import sys
from pathlib import Path

import pytest

from recdistill.config import load_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import paper_tables  # noqa: E402


@pytest.mark.parametrize("table", paper_tables.TABLES)
def test_each_table_is_an_experiment_over_the_demo_config(table):
    cfg = load_config([ROOT / "configs" / "demo.yaml", ROOT / "configs" / "experiments" / f"{table}.yaml"])
    names = {s.name for s in cfg.experiment.students}
    distilled = [s for s in cfg.experiment.students if s.base is not None]
    assert all(s.base in names and s.base.startswith("base") for s in distilled)
    assert distilled or table == "ablations"  # the ablation grid measures every variant from its one base
    for s in cfg.experiment.students:  # every student's overrides resolve, and each pair differs only in the towers
        sc = load_config([ROOT / "configs" / "demo.yaml"], s.set)
        if s.base is not None:
            base = next(b for b in cfg.experiment.students if b.name == s.base)
            bc = load_config([ROOT / "configs" / "demo.yaml"], base.set)
            same = {k: v for k, v in sc.student.model_dump().items() if k not in ("towers", "tower_loss")}
            assert same == {k: v for k, v in bc.student.model_dump().items() if k not in ("towers", "tower_loss")}
            assert (bc.student.towers, bc.student.tower_loss) == ("single", "task") and sc.student.tower_loss != "task"


def _seed(gain: float, se: float, base: float = 0.70) -> dict:
    return {"teacher": {"ctr": 0.75}, "students": {
        "base_m": {"auc": {"ctr": base}, "served_params": 10},
        "distilled_m": {"auc": {"ctr": base + gain}, "served_params": 10, "base": "base_m", "gain": {"ctr": gain},
                        "gain_se": {"ctr": se}, "transferability": {"ctr": gain / (0.75 - base)}}}}


def test_a_gain_clears_the_noise_only_beyond_twice_the_seed_spread_and_the_bootstrap_se():
    clear = paper_tables.aggregate({0: _seed(0.010, 0.001), 1: _seed(0.012, 0.001), 2: _seed(0.011, 0.001)})
    c = clear["students"]["distilled_m"]["tasks"]["ctr"]
    assert c["gain_mean"] == pytest.approx(0.011) and c["gain_sd"] == pytest.approx(0.001)
    assert c["transferability_mean"] == pytest.approx(0.22) and c["clears_noise"]
    spread = paper_tables.aggregate({0: _seed(0.010, 0.001), 1: _seed(-0.004, 0.001), 2: _seed(0.003, 0.001)})
    assert not spread["students"]["distilled_m"]["tasks"]["ctr"]["clears_noise"]  # seeds disagree
    wide = paper_tables.aggregate({0: _seed(0.004, 0.003), 1: _seed(0.004, 0.003)})
    assert not wide["students"]["distilled_m"]["tasks"]["ctr"]["clears_noise"]  # within the bootstrap SE
    md = paper_tables.table_md("t", clear, [0, 1, 2])
    assert "| distilled_m | 10 | ctr | 0.7000 | 0.7110 | +0.0110 ± 0.0010 (0.0010) | 22% ± 2% |" in md
    assert "within noise" in paper_tables.table_md("t", wide, [0, 1])
