"""Tracker (real offline W&B run, JSONL, rank gating), progress, and report helpers."""

import json

import pytest

from recdistill.config import TrackingConfig
from recdistill.report import markdown_table, plot_bars, plot_lines, write_report
from recdistill.tracking import Tracker, progress


def test_offline_wandb_run_lives_in_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    run_dir = tmp_path / "runs" / "r1"
    t = Tracker(TrackingConfig(mode="offline"), run_dir, {"a": 1}, name="r1")
    for step in range(3):
        t.log({"loss/train": 1.0 / (step + 1), "auc/ctr": 0.5 + step / 10}, step=step)
    t.summary({"auc/ctr": 0.7, "ne/ctr": float("nan")})
    t.finish()
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), "offline W&B run file missing"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines[:3]] == [0, 1, 2]
    assert lines[2]["auc/ctr"] == pytest.approx(0.7)
    assert lines[3] == {"summary": {"auc/ctr": 0.7, "ne/ctr": None}}


def test_env_disabled_wins_and_other_ranks_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    t = Tracker(TrackingConfig(mode="offline"), tmp_path / "a")
    t.log({"x": 1}, step=0)
    t.finish()
    assert not (tmp_path / "a" / "wandb").exists()
    assert (tmp_path / "a" / "metrics.jsonl").read_text().count("\n") == 1
    t1 = Tracker(TrackingConfig(mode="disabled"), tmp_path / "b", rank=1)
    t1.log({"x": 1}, step=0)
    t1.summary({"x": 1})
    t1.finish()
    assert not (tmp_path / "b").exists()


def test_progress_passthrough_and_rank_gate(capsys):
    assert list(progress(range(4), desc="x", rank=1)) == [0, 1, 2, 3]
    assert capsys.readouterr().err == ""
    assert list(progress(range(4), desc="bar", rank=0)) == [0, 1, 2, 3]
    assert "bar" in capsys.readouterr().err


def test_markdown_table_exact():
    rows = [{"model": "teacher", "auc": 0.81234, "n": 3}, {"model": "base", "auc": float("nan"), "extra": True}]
    assert markdown_table(rows, floatfmt=".3f") == (
        "| model | auc | n | extra |\n|---|---|---|---|\n| teacher | 0.812 | 3 |  |\n| base | nan |  | True |")
    assert markdown_table([]) == "(no rows)"


def test_plots_and_report(tmp_path):
    a = plot_lines(tmp_path / "l.png", [0, 1, 2], {"ctr": [0.7, 0.72, 0.71]}, title="t", hlines={"bayes": 0.8})
    b = plot_bars(tmp_path / "sub" / "b.png", ["ctr", "cvr"], {"base": [0.7, 0.6], "teacher": [0.75, 0.66]},
                  ref={"bayes": [0.8, 0.7]})
    for p in (a, b):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    rep = write_report(tmp_path, "Title", [("Numbers", "| a |\n|---|\n| 1 |")], images=[a, b])
    text = rep.read_text()
    assert text.startswith("# Title\n") and "## Numbers" in text
    assert "![l](l.png)" in text and "![b](sub/b.png)" in text
