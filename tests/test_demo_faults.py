"""The demo when its teacher fails or is interrupted, and on MovieLens: real `recdistill demo` runs with a tiny
teacher on 2 gloo ranks (a minute or more each on a small CPU machine)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recdistill.cli import main
from recdistill.data.movielens import TASKS
from recdistill.preflight import SAMPLE_ROWS
from recdistill.signals.reader import SignalReader

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", str(ROOT / "configs" / "teacher" / "tiny.yaml"), "--set", "data.batch_size=128",
        "--set", "tracking.progress=false", "--set", "student.history_len=8", "--set", "tracking.mode=disabled"]
# one student, not exported (torch.export is most of a small student's time; tests/test_demo.py checks the export)
ONE_STUDENT = ["--set", "experiment.students=[{name: base, set: [student.towers=single, student.tower_loss=task]}]",
               "--set", "student.export=false"]


def err_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("recdistill ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_data_fault_the_teacher_meets_is_one_line_with_its_log(tmp_path, capsys, monkeypatch):
    """A fault past the rows checked before the run: the teacher's ranks meet it; the user gets its cause, not
    torchrun's ChildFailedError, and where the full log is."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    data = tmp_path / "pq"
    assert main(["data", "export", str(data), "--set", "data.num_days=2", "--set", "data.samples_per_day=3000",
                 "--set", "data.history_len=8", "--set", "tracking.progress=false"]) == 0
    day0 = data / "day=0" / "part-00000.parquet"
    t = pq.read_table(day0)
    hist = t.column("hist_cat").to_pylist()
    # past the rows checked before the run, and a positive: the teacher's view (q=1) keeps it, so its ranks read it
    # (the view is pushed down into the source: a row no view keeps is never converted, nor checked)
    ctr = t.column("label_ctr").to_pylist()
    row = next(i for i in range(SAMPLE_ROWS + 50, len(ctr)) if ctr[i] > 0.5)
    hist[row] = hist[row] + [0]
    i = t.schema.get_field_index("hist_cat")
    t = t.set_column(i, t.schema.field(i), pa.array(hist, t.schema.field(i).type))
    pq.write_table(t.replace_schema_metadata(pq.read_schema(day0).metadata), day0)
    capsys.readouterr()
    code = main(["demo", *TINY, *ONE_STUDENT, "--set", "data.source=parquet", "--set", f"data.path={data}",
                 "--set", f"tracking.run_dir={tmp_path / 'runs'}", "--set", "tracking.run_name=f"])
    log = tmp_path / "runs" / "f" / "teacher.log"
    line = err_line(capsys.readouterr().err)
    assert code == 1 and line.startswith("recdistill demo: teacher failed: ")
    assert f"{day0}: column 'hist_cat' has a different length than 'hist_item'" in line
    assert line.endswith(f"; fix: full log: {log}") and "ChildFailedError" in log.read_text()


@pytest.mark.slow
@pytest.mark.multiproc
def test_ctrl_c_stops_the_teacher_and_resume_finishes_the_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    run = tmp_path / "r"
    small = [*TINY, *ONE_STUDENT, "--set", "data.num_days=3", "--set", "data.samples_per_day=4000", "--set",
             "signals.window_steps=4", "--set", "data.world.num_users=300", "--set", "data.world.num_items=500"]
    proc = subprocess.Popen([sys.executable, "-m", "recdistill.cli", "demo", *small,
                             "--set", f"tracking.run_dir={tmp_path}", "--set", "tracking.run_name=r"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    deadline = time.time() + 400
    while not list((run / "teacher_ckpt").glob("step=*/meta.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: every process of the foreground group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err_line(err) == "recdistill demo: interrupted", err
    time.sleep(1)
    with pytest.raises(ProcessLookupError):  # no rank or launcher left behind
        os.killpg(proc.pid, 0)
    assert not (run / "report.md").exists()
    r = subprocess.run([sys.executable, "-m", "recdistill.cli", "demo", "--resume", str(run)], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "teacher: resumed from" in (run / "teacher.log").read_text() and (run / "report.md").exists()
    reader = SignalReader(str(run / "signals"))
    assert reader.stats.duplicates == 0 and reader.stats.rows > 0
    assert not [p for p in tmp_path.iterdir() if p != run]  # the resumed run wrote into its own directory only


@pytest.mark.slow
@pytest.mark.multiproc
def test_movielens_demo_end_to_end(tmp_path, monkeypatch):
    """An unset data.tasks means MovieLens' own tasks, also for the teacher's ranks that reload the saved config.
    One baseline, GBDT, on MovieLens' rows (the LR fit on its ~70,000 teacher rows took 15 of the baselines' 17 s;
    tests/test_demo.py fits both on synthetic rows)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(["demo", *TINY, "--set", "data.source=movielens", "--set", "data.num_days=10",
                 "--set", "data.history_len=16", "--set", "teacher.steps=8", "--set", "student.train_days=1",
                 "--set", "experiment.baselines=[gbdt]",
                 "--set", f"tracking.run_dir={tmp_path}", "--set", "tracking.run_name=m", *ONE_STUDENT]) == 0
    report = (tmp_path / "m" / "report.md").read_text()
    assert "on movielens data" in report and "| teacher |" in report and "| base |" in report
    assert "| baseline_gbdt |" in report  # the baselines' features and fit on MovieLens' tasks
    assert SignalReader(str(tmp_path / "m" / "signals")).meta.tasks == list(TASKS)
