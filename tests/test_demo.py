"""`recdistill demo` / `recdistill experiment` end to end: a real 2-rank torchrun teacher writing signals, real
students joining them, the comparison report, plots, metrics.jsonl and an offline W&B run."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from recdistill.cli import main
from recdistill.distill.metrics import auc_standard_error
from recdistill.signals.reader import SignalReader

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", str(ROOT / "configs" / "teacher" / "tiny.yaml"),  # absolute: tests run from any cwd
        "--set", "data.num_days=3", "--set", "data.samples_per_day=6000", "--set", "data.batch_size=128",
        "--set", "tracking.progress=false", "--set", "student.history_len=16",
        "--set", "data.world.num_users=400", "--set", "data.world.num_items=800"]

# The demo's own config (its world, samplings, students: decoupled towers, exact debias, beta 100) scaled down so
# that it runs in a test: 4 days of 10,000 samples, 64 history events, the teacher's batch 64 for enough steps, the
# students 3 passes over their 2 days. At this size the teacher still learns clearly more than the base student.
DEMO_SMALL = ["--config", str(ROOT / "configs" / "demo.yaml"),
              "--set", "data.num_days=4", "--set", "data.samples_per_day=10000", "--set", "data.batch_size=64",
              "--set", "data.history_len=64", "--set", "teacher.history_len=64", "--set", "student.history_len=16",
              "--set", "student.epochs=3", "--set", "tracking.progress=false"]


@pytest.mark.slow
@pytest.mark.multiproc
def test_demo_then_an_experiment_on_its_signals(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["demo", *DEMO_SMALL, "--set", f"tracking.run_dir={tmp_path}", "--set", "tracking.run_name=d"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "d"
    report = (run / "report.md").read_text()
    for row in ("| teacher |", "| base |", "| distilled |", "| Bayes-optimal (ceiling) |", "| distilled | ctr |",
                "| baseline_lr |", "| baseline_gbdt |", "ctr: teacher vs best baseline: "):
        assert row in report, row
    assert "report " in out and "W&B " in out and "| transferability |" in out
    for png in ("auc_by_model.png", "transferability.png"):
        assert (run / png).stat().st_size > 5000
    teacher = json.loads((run / "teacher.rank0.json").read_text())
    trained = teacher["trained_samples"] + json.loads((run / "teacher.rank1.json").read_text())["trained_samples"]
    reader = SignalReader(str(run / "signals"))
    assert reader.stats.rows == trained > 0 and reader.stats.duplicates == 0
    summary = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["summary"]
    for k in ("teacher/auc/ctr", "base/auc/ctr", "distilled/auc/ctr", "distilled/transferability/ctr",
              "baseline_lr/auc/ctr", "baseline_gbdt/auc/ctr", "baseline_lr/ne/cvr"):
        assert k in summary and np.isfinite(summary[k]), k
    # the baselines, trained on the teacher's rows, scored on the same rows: clearly better than chance, below the
    # ceiling, NE below 1 (their predictions are mapped back from the teacher's sampled space)
    for m in ("baseline_lr", "baseline_gbdt"):
        assert 0.65 < summary[f"{m}/auc/ctr"] < summary["base/bayes_auc/ctr"] and summary[f"{m}/ne/ctr"] < 1, m
    assert (run / "baselines" / "baseline_gbdt.eval_preds.npz").is_file()
    assert 0.7 < summary["base/bayes_auc/ctr"] < 0.95  # the world's ceiling
    # Distillation pays on the demo's settings: the distilled student's served tower beats the base on CTR by more
    # than twice the standard error of the difference. Each AUC's SE is Hanley-McNeil from this run's evaluation
    # counts, combined as if independent, which overstates it: both models are scored on the same rows.
    y = np.load(run / "students" / "base.eval_preds.npz")["label_ctr"] > 0.5
    ses = [auc_standard_error(summary[f"{m}/auc/ctr"], int(y.sum()), int((~y).sum())) for m in ("base", "distilled")]
    gain = summary["distilled/auc/ctr"] - summary["base/auc/ctr"]
    assert gain > 2 * math.hypot(*ses), (gain, ses)
    assert (run / "students" / "distilled_main_tower.pt2").stat().st_size > 0
    assert list((run / "wandb").glob("offline-run-*"))
    # one teacher, N students: more students on the same committed signals, no teacher run
    monkeypatch.setenv("WANDB_MODE", "disabled")
    students = ("[{name: base, set: [student.towers=single, student.tower_loss=task]}, "
                "{name: none, set: [student.debias=none]}, {name: exact, set: [student.debias=exact]}]")
    # (no export: the demo above checked it; torch.export is most of a small student's time; one pass over one day:
    # what is checked here is the reuse of the signals and the report's rows, not the students' numbers)
    assert main(["experiment", *DEMO_SMALL, "--set", "student.epochs=1", "--set", "student.train_days=1",
                 "--set", "student.export=false",
                 "--set", f"tracking.run_dir={tmp_path}",
                 "--set", "tracking.run_name=e",
                 "--set", f"experiment.teacher_signals={run / 'signals'}",
                 "--set", f"experiment.students={students}", "--set", "experiment.baselines=[]"]) == 0
    report = (tmp_path / "e" / "report.md").read_text()
    assert "| none | ctr |" in report and "| exact | ctr |" in report and "(reused signals)" in report
    assert "baseline_lr" not in report.split("## Gains")[0].split("## Next-day")[1]  # experiment.baselines=[]
    assert not (tmp_path / "e" / "signals").exists()


@pytest.mark.slow
@pytest.mark.multiproc
def test_demo_on_exported_parquet(tmp_path, monkeypatch):
    """Also run from another directory with relative paths: the teacher ranks must resolve them from the caller's
    cwd (they once ran in the repo root: 'config file not found'), the shipped DeepSpeed JSON from the repo."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    assert main(["data", "export", "pq", "--view", "teacher", *TINY[2:]]) == 0
    assert main(["demo", *TINY, "--set", "data.source=parquet", "--set", "data.path=pq",
                 "--set", "tracking.run_dir=runs", "--set", "tracking.run_name=p",
                 "--set", "experiment.baselines=[lr]", "--set", "student.export=false"]) == 0  # export: the test above
    report = (tmp_path / "runs" / "p" / "report.md").read_text()
    assert "`teacher`: r=0.5" in report and "`student`: r=0.1" in report and "| distilled | ctr |" in report
    assert "| baseline_lr |" in report and "| baseline_gbdt |" not in report  # the baselines read Parquet too


def test_bad_student_list_is_a_config_error(capsys):
    assert main(["demo", "--set", "experiment.students=[{name: a}, {name: a}]"]) == 2
    assert "names must be unique" in capsys.readouterr().err
