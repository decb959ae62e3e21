"""The robustness suite: configs/worlds/*.yaml are valid demo configs, the parquet_byo world's directory reads back
through data.roles alone, the vectorised bootstrap agrees with the project's AUC, and benchmarks/robustness.py
runs a world end to end (quick), then reuses it."""

import argparse
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from recdistill.config import load_config
from recdistill.data.parquet import ParquetSource
from recdistill.data.roles import resolve_roles
from recdistill.models.student import StudentModel

ROOT = Path(__file__).resolve().parents[1]
WORLDS = sorted((ROOT / "configs" / "worlds").glob("*.yaml"))
DEMO = ROOT / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def robustness():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield importlib.import_module("robustness")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_every_world_is_a_valid_demo_config_that_varies_something(robustness, tmp_path):
    assert len(WORLDS) >= 8 and robustness.world_names()[0] == "pairwise"
    demo = load_config([DEMO])
    for path in WORLDS:
        assert path.read_text().startswith("# "), f"{path.name}: first line says what the world varies"
        for quick in (False, True):  # and with the suite's overrides, --quick too
            args = argparse.Namespace(quick=quick, overrides=[], bootstrap=200)
            load_config([DEMO, path], robustness.world_overrides(args, path.stem, tmp_path))
        cfg = load_config([DEMO, path])
        assert cfg.experiment.name == path.stem
        data = cfg.data.model_dump(exclude={"roles"})
        if path.stem != "pairwise":  # the demo world as it is
            assert data != demo.data.model_dump(exclude={"roles"}), path.name
    movielens = load_config([DEMO, ROOT / "configs" / "worlds" / "movielens.yaml"]).data
    assert movielens.source == "movielens" and [t.name for t in movielens.tasks] == ["ctr", "rating"]


def test_parquet_byo_directory_reads_back_through_roles(robustness, tmp_path):
    args = argparse.Namespace(quick=True, overrides=["data.num_days=2", "data.samples_per_day=300"], bootstrap=200)
    robustness.prepare_byo(args, tmp_path)
    out = tmp_path / "parquet_byo.data"
    cfg = load_config([DEMO, ROOT / "configs" / "worlds" / "parquet_byo.yaml"],
                      [f"data.path={out}", "data.history_len=64"])
    src = ParquetSource.from_config(cfg.data)
    assert "sparse_user_id" not in src.columns and {"sparse_user", "sparse_cat", "hist_genre"} <= set(src.columns)
    # nothing declared and, but for hist_item (the layout requires it), no conventional name: only data.roles
    assert {r for r, o in src.role_origin.items() if o != "missing"} == {"hist_item"}
    roles = resolve_roles(cfg.data.roles, src)
    assert (roles.user, roles.item, roles.category, roles.hist_category) == ("user", "item", "cat", "genre")
    assert src.days() == [0, 1] and src.num_rows(1) == 300
    b = src.read(1, 0, 300)
    assert set(b.history.fields) == {"item", "genre", "event", "time"} and set(b.p_true) == {"ctr", "cvr", "watch_time"}
    # a student built on the inferred vocabularies runs on every row (the candidate item's id range included)
    model = StudentModel(src.schema, roles=roles, history_len=16)
    with torch.no_grad():
        main = model(b).main
    assert all(torch.isfinite(v).all() and len(v) == 300 for v in main.values())
    # kept while the export's settings are the same, written again when they change
    stamp = (out / "_COMPLETE").stat().st_mtime_ns
    robustness.prepare_byo(args, tmp_path)
    assert (out / "_COMPLETE").stat().st_mtime_ns == stamp
    args.overrides = ["data.num_days=2", "data.samples_per_day=200"]
    robustness.prepare_byo(args, tmp_path)
    assert ParquetSource(str(out)).num_rows(1) == 200


@pytest.mark.slow
@pytest.mark.multiproc
def test_quick_suite_on_one_world_then_reused(robustness, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "robustness.json"
    # no student export: the suite reads none (torch.export is most of a quick student's time); half of --quick's
    # 6,000 samples a day: what is checked here is the suite's bookkeeping (statuses, targets, the paired SE, the
    # table, the reuse), not the world's numbers, and the user's --set comes after the quick sizes
    argv = ["--quick", "--only", "pairwise", "--run-dir", str(tmp_path / "runs"), "--out", str(out),
            "--set", "student.export=false", "--set", "data.samples_per_day=3000"]
    robustness.main(argv)
    doc = json.loads(out.read_text())
    world = doc["worlds"]["pairwise"]
    assert world["status"] == "finished" and len(world["attempts"]) == 1 and doc["versions"]["torch"]
    ctr = world["result"]["tasks"]["ctr"]
    assert 0.5 < ctr["bayes_auc"] <= 1 and all(ctr["auc"][m] is not None for m in ("teacher", "base", "distilled"))
    assert set(world["targets"]) == {"teacher_beats_best_baseline_by_0.01", "ne_below_1_everywhere",
                                     "ctr_transferability_at_least_50pct", "no_negative_transfer_beyond_2se"}
    assert ctr["distilled_minus_base_se"] > 0 and "median_ctr_transferability" in doc["suite_targets"]
    assert out.with_suffix(".png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "| pairwise | ctr |" in printed and "| pairwise | cvr |" in printed
    lead = ctr["auc"]["teacher"] - max(ctr["auc"]["baseline_lr"], ctr["auc"]["baseline_gbdt"])
    header = next(line for line in printed.splitlines() if line.startswith("| world | task |"))
    row = next(line for line in printed.splitlines() if line.startswith("| pairwise | ctr |"))
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")], strict=True))
    assert cells["teacher - best"] == f"{lead:+.4f}"
    assert world["targets"]["teacher_beats_best_baseline_by_0.01"] == (lead >= 0.01)
    robustness.main(argv)  # finished: reused, not run again
    assert len(json.loads(out.read_text())["worlds"]["pairwise"]["attempts"]) == 1
