"""`recdistill data export|inspect` and `recdistill demo` through the real CLI entry point."""

import json

import pyarrow.parquet as pq

from recdistill.cli import main


def test_export_then_inspect(tmp_path, capsys):
    out = tmp_path / "pq"
    sets = ["--set", "data.num_days=2", "--set", "data.samples_per_day=400", "--set", "data.history_len=16",
            "--set", "tracking.progress=false"]
    assert main(["data", "export", str(out), "--view", "student", "--days", "1", *sets]) == 0
    assert "wrote 1 files" in capsys.readouterr().out
    meta = pq.read_schema(next(out.rglob("*.parquet"))).metadata
    assert json.loads(meta[b"recdistill.sampling"])["name"] == "student"
    assert main(["data", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "days [1]" in text and "ctr (binary)" in text and '"name":"student"' in text and "day 1:" in text
    assert main(["data", "export", str(out), "--days", "7", *sets]) == 2
    assert "--days [7] not in the source" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path / "missing")]) == 1


def test_demo_runs_end_to_end_and_reports_honestly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    code = main(["demo", "--set", "data.num_days=3", "--set", "data.samples_per_day=600", "--set",
                 "data.history_len=32", "--set", f"tracking.run_dir={tmp_path}", "--set", "tracking.run_name=t",
                 "--set", "tracking.progress=false"])
    assert code == 0
    out = capsys.readouterr().out
    run = tmp_path / "t"
    report = (run / "report.md").read_text()
    assert "No distillation was performed" in out and "no distillation result" in report
    assert "| day | split | rows |" in report and "Student samples missing from the teacher view: 0" in report
    assert (run / "bayes_auc_by_day.png").stat().st_size > 5000 and (run / "config.yaml").exists()
    summary = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["summary"]
    assert summary["data/rows"] == 1800 and 0.7 < summary["eval_ceiling/bayes_auc/ctr"] < 0.95
    assert list((run / "wandb").glob("offline-run-*"))


def test_demo_on_exported_parquet(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    small = ["--set", "data.num_days=3", "--set", "data.samples_per_day=300", "--set", "data.history_len=8",
             "--set", "tracking.progress=false"]
    assert main(["data", "export", str(tmp_path / "pq"), "--view", "teacher", *small]) == 0
    assert main(["demo", "--set", "data.source=parquet", "--set", f"data.path={tmp_path / 'pq'}",
                 "--set", f"tracking.run_dir={tmp_path}", "--set", "tracking.run_name=p", *small]) == 0
    report = (tmp_path / "p" / "report.md").read_text()
    assert "`teacher`: r=0.5" in report and "`student`: r=0.1" in report
