"""benchmarks/paper_tables.py, scaling_transfer.py and decoupled_regime.py: their configs load over the demo config,
a gain is called out only where it clears both the seed spread and the paired bootstrap SE, the scaling share is
paired by seed, damaged signal stores change only the logits, and a finished run is reused only for its config."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

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


# ---- benchmarks/scaling_transfer.py ------------------------------------------------------------------------------
from benchmarks import decoupled_regime, scaling_transfer  # noqa: E402


def _variant(teacher: float, distilled: list[float], base: list[float]) -> dict[int, dict]:
    """collect() per seed of one teacher variant (transferability as the experiment reports it)."""
    return {s: {"teacher": {"ctr": teacher}, "students": {
        "base": {"auc": {"ctr": b}},
        "distilled": {"auc": {"ctr": d}, "transferability": {"ctr": (d - b) / (teacher - b) if teacher > b else None}}}}
            for s, (d, b) in enumerate(zip(distilled, base, strict=True))}


def test_scaling_share_kept_is_the_student_gain_over_the_teacher_gain_paired_by_seed():
    base = [0.70, 0.71]
    small, large = _variant(0.80, [0.76, 0.77], base), _variant(0.82, [0.77, 0.79], base)
    c = scaling_transfer.axis_table(small, large)["ctr"]
    assert c["teacher_scaling_gain"] == pytest.approx(0.02)
    assert c["share_kept_mean"] == pytest.approx((0.5 + 1.0) / 2)  # seed 0: 0.01 / 0.02, seed 1: 0.02 / 0.02
    assert c["transferability_small_mean"] == pytest.approx((0.06 / 0.10 + 0.06 / 0.09) / 2)
    assert c["distilled_large_mean"] == pytest.approx(0.78) and c["base_mean"] == pytest.approx(0.705)
    assert c["teacher_gain_clears_noise"]  # 0.02 > 2 x sqrt(2) x 0.0018
    assert "| x | ctr | 0.8000 -> 0.8200 (+0.0200) |" in scaling_transfer.table_md({"x": {"ctr": c}}, [0, 1])
    flat = scaling_transfer.axis_table(small, _variant(0.803, [0.77, 0.79], base))["ctr"]
    assert not flat["teacher_gain_clears_noise"]  # a share of a 0.003 teacher gain would divide by noise
    assert "teacher gain within its noise" in scaling_transfer.table_md({"x": {"ctr": flat}}, [0, 1])
    # a teacher below one seed's base: that seed has no transferability, and no mean over the others stands for it
    low = scaling_transfer.axis_table(_variant(0.705, [0.76, 0.77], base), large)["ctr"]
    assert low["transferability_small_undefined_seeds"] == 1 and low["transferability_small_mean"] is None
    assert "| undefined at 1 of 2 seeds / " in scaling_transfer.table_md({"x": {"ctr": low}}, [0, 1])


def test_every_scaling_variant_resolves_over_the_demo_config():
    for sets in scaling_transfer.VARIANTS.values():
        load_config([ROOT / "configs" / "demo.yaml"], sets)
    assert all(s in scaling_transfer.VARIANTS and l in scaling_transfer.VARIANTS
               for s, l in scaling_transfer.AXES.values())


# ---- benchmarks/decoupled_regime.py ------------------------------------------------------------------------------
def test_damaged_stores_keep_ids_and_windows_and_change_only_the_logits(tmp_path):
    from helpers import META

    from recdistill.signals.reader import SignalReader
    from recdistill.signals.writer import SignalWriter

    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    with SignalWriter(str(src), 0, META) as w:
        for window in range(3):
            ids = torch.arange(2000) + window * 10_000
            w.begin_window(window)
            w.write(ids, torch.from_numpy(rng.standard_normal((2000, 2)).astype(np.float32)), window)
            w.commit_window()
    clean = SignalReader(str(src))
    ids = torch.from_numpy(np.sort(clean.sample_ids))
    z, _ = clean.lookup(ids)
    out = {}
    for kind in ("bias", "noise", "garbage"):
        r = SignalReader(str(decoupled_regime.write_damaged(src, tmp_path / kind, kind)))
        assert r.windows == clean.windows and r.meta == clean.meta
        assert np.array_equal(np.sort(r.sample_ids), ids.numpy())
        out[kind], found = r.lookup(ids)
        assert found.all()
    assert torch.allclose(out["bias"], z + decoupled_regime.BIAS)
    assert (out["noise"] - z).std().item() == pytest.approx(decoupled_regime.NOISE * z.std().item(), rel=0.05)
    moved = (out["garbage"] != z).any(1).float().mean().item()
    assert 0.25 < moved <= decoupled_regime.GARBAGE + 0.02  # a permuted row can land on itself
    assert torch.equal(out["garbage"][:, 0].sort().values, z[:, 0].sort().values)  # the same values, reassigned
    again = decoupled_regime.write_damaged(src, tmp_path / "bias", "bias")  # complete: reused as it is
    assert torch.equal(SignalReader(str(again)).lookup(ids)[0], out["bias"])


def test_the_regime_config_pairs_each_damaged_store_with_both_designs(tmp_path):
    stores = {"clean": tmp_path / "a", "bias": tmp_path / "b"}
    cfg = load_config([ROOT / "configs" / "demo.yaml", decoupled_regime.students_config(stores, tmp_path / "c.yaml")])
    by = {s.name: load_config([ROOT / "configs" / "demo.yaml"], s.set).student for s in cfg.experiment.students}
    assert set(by) == {"base", "decoupled_clean", "single_clean", "decoupled_bias", "single_bias"}
    assert (by["base"].towers, by["base"].tower_loss) == ("single", "task")
    assert (by["single_bias"].towers, by["decoupled_bias"].towers) == ("single", "decoupled")
    assert by["single_bias"].signals_uri == str(tmp_path / "b") == by["decoupled_bias"].signals_uri
    assert all(s.base == "base" for s in cfg.experiment.students if s.name != "base")


def test_a_finished_run_is_reused_only_for_the_config_it_ran(tmp_path):
    from recdistill.config import save_config

    configs, sets = [ROOT / "configs" / "demo.yaml"], ["teacher.history_len=128"]
    run_dir = tmp_path / "v-seed0"
    full = [*sets, f"tracking.run_dir={tmp_path.resolve()}", "tracking.run_name=v-seed0", "experiment.baselines=[]",
            "tracking.mode=disabled", "tracking.progress=false"]
    # saved as a run saves it: with its count cache set in its own directory (what no one asked for)
    save_config(load_config(configs, [*full, f"data.count_cache={run_dir / 'count_tables'}"]), run_dir)
    (run_dir / "report.md").write_text("done")
    assert paper_tables.run_experiment(tmp_path, "v-seed0", configs, sets) == (run_dir, None)
    with pytest.raises(SystemExit, match=r"another config .*\['teacher'\]"):
        paper_tables.run_experiment(tmp_path, "v-seed0", configs, ["teacher.history_len=256"])


# ---- benchmarks/suite_students.py --------------------------------------------------------------------------------
from benchmarks import suite_students  # noqa: E402


def test_suite_students_variants_parse_and_bad_ones_name_the_flag():
    assert suite_students.parse_variant("default") == ("default", [])
    assert suite_students.parse_variant("bins:student.dense=bins,student.lr=0.01") == (
        "bins", ["student.dense=bins", "student.lr=0.01"])
    for bad in ("bins:student.dense", ":a=b", "default:student.lr=1"):
        with pytest.raises(Exception, match="--variant"):
            suite_students.parse_variant(bad)


def test_suite_students_targets_are_judged_on_each_worlds_mean_over_seeds():
    worlds = {  # teacher 0.75, base 0.70: transferability = gain / 0.05
        "a": suite_students.world_summary({0: _seed(0.040, 0.001), 1: _seed(0.030, 0.001)}),  # 70%
        "b": suite_students.world_summary({0: _seed(0.030, 0.001), 1: _seed(0.010, 0.001)}),  # 40%: below 50%
        "c": suite_students.world_summary({0: _seed(0.035, 0.001), 1: _seed(-0.003, 0.001)}),  # seed 1 negative
    }
    assert worlds["a"]["tasks"]["ctr"]["transferability_mean"] == pytest.approx(0.7)
    assert worlds["c"]["tasks"]["ctr"]["seeds_negative_beyond_2se"] == [1]
    assert worlds["b"]["tasks"]["ctr"]["seeds_negative_beyond_2se"] == []  # a small gain is not a negative one
    t = suite_students.suite_targets(worlds)
    assert t["median_ctr_transferability"] == pytest.approx(0.4)  # 70%, 40%, 32%
    assert t["worlds_below_50pct"] == ["b", "c"]
    assert t["negative_transfer_beyond_2se"] == {"c": {"ctr": [1]}}
    md = suite_students.table_md({"variants": {"default": {"worlds": worlds, "targets": t}}})
    assert "| a | 70% ± 14% (0.7000 -> 0.7350) |" in md and "| **median** | 40% |" in md
