"""What a user sees when something goes wrong: one line with the cause and the fix, the documented exit status,
and nothing left behind when the check comes before the work. Every fault goes through the real command
(`recdistill.cli.main`, or `python -m recdistill.cli` where the process itself matters: tracebacks, pipes,
signals). The teacher's failures and interrupts: tests/test_demo_faults.py."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import META, ids_of, logits_of

from recdistill.cli import build_parser, main
from recdistill.cli.demo import _config
from recdistill.config import PRESETS, load_config, preset_names, save_config
from recdistill.errors import RunError
from recdistill.experiment import default_config_path
from recdistill.preflight import SAMPLE_ROWS, new_run_dir
from recdistill.signals.writer import SignalWriter

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "data.num_days=2", "--set", "data.samples_per_day=300", "--set", "data.history_len=8",
         "--set", "tracking.progress=false", "--set", "data.world.num_users=50", "--set", "data.world.num_items=80"]


def recdistill(*args, **kw):
    """`python -m recdistill.cli ...` in a fresh process (the console script's code path)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "recdistill.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300, **kw)


def one_line(err: str) -> str:
    """The error line: exactly one line on stderr (library warnings aside), starting with 'recdistill '."""
    lines = [ln for ln in err.splitlines() if ln.startswith("recdistill ")]
    assert len(lines) == 1, err
    return lines[0]


def test_config_error_is_one_line_exit_2_and_debug_keeps_the_traceback(tmp_path):
    r = recdistill("demo", "--set", "teacher.preset=huge", "--set", f"tracking.run_dir={tmp_path}")
    line = one_line(r.stderr)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert line.startswith("recdistill demo: --set teacher.preset=huge: teacher.preset 'huge' is not a preset")
    assert all(name in line for name in preset_names()) and "; fix: `recdistill config`" in line
    assert list(tmp_path.iterdir()) == []
    r = recdistill("--debug", "demo", "--set", "teacher.preset=huge")
    assert r.returncode == 2 and "Traceback (most recent call last)" in r.stderr and "ConfigError" in r.stderr


def test_missing_data_path_and_unusable_run_dir_exit_1_before_any_run_dir(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["demo", "--set", "data.source=parquet", "--set", f"data.path={tmp_path / 'nope'}",
                 "--set", f"tracking.run_dir={runs}"]) == 1
    assert f"data.path={tmp_path / 'nope'}: no such directory; fix: set data.path" in one_line(capsys.readouterr().err)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["student", *SMALL, "--set", "student.tower_loss=task", "--set", "student.towers=single",
                 "--set", f"tracking.run_dir={blocker / 'runs'}"]) == 1
    assert f"tracking.run_dir={blocker / 'runs'}: {blocker} is not a directory" in one_line(capsys.readouterr().err)
    assert not runs.exists() and blocker.read_text() == ""


def test_signal_stores_are_checked_before_work(tmp_path, capsys):
    runs, empty = tmp_path / "runs", tmp_path / "empty"
    empty.mkdir()
    assert main(["student", *SMALL, "--set", f"student.signals_uri={tmp_path / 'none'}",
                 "--set", f"tracking.run_dir={runs}"]) == 1
    line = one_line(capsys.readouterr().err)
    assert f"student.signals_uri={tmp_path / 'none'}: no such signal store; fix: train the teacher first" in line
    assert main(["experiment", *SMALL, "--set", f"experiment.teacher_signals={empty}",
                 "--set", f"tracking.run_dir={runs}"]) == 1
    assert f"experiment.teacher_signals={empty}: no committed signal shard" in one_line(capsys.readouterr().err)
    assert not runs.exists()


def test_a_bad_student_override_fails_before_the_teacher(tmp_path, capsys):
    students = "[{name: base, set: [student.towers=single, student.tower_loss=task]}, {name: x, set: [student.bta=2]}]"
    assert main(["experiment", *SMALL, "--set", f"experiment.students={students}",
                 "--set", f"tracking.run_dir={tmp_path}"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "experiment.students[x]: --set student.bta=2: unknown key 'student.bta'" in line
    assert list(tmp_path.iterdir()) == []


def test_broken_pipe_is_quiet(tmp_path):
    """`recdistill config | head -1`: the reader goes away; no traceback, no 'Exception ignored' at exit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "recdistill.cli", "config"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # before the child writes anything: every write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    """An export big enough to be running when SIGINT comes (what Ctrl-C sends)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "pq"
    proc = subprocess.Popen([sys.executable, "-m", "recdistill.cli", "data", "export", str(out),
                             "--set", "data.samples_per_day=2000000", "--set", "tracking.progress=false"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            # a SIGINT ignored in this process (left so by some earlier test) would be inherited,
                            # and Python installs no KeyboardInterrupt handler when it starts with SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 600  # a loaded machine can take minutes to get there
        while not list(out.rglob("*.parquet")) and time.time() < deadline:  # it is writing: well past the imports
            time.sleep(0.2)
        assert list(out.rglob("*.parquet")), "the export wrote nothing in 600 s"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # never leave a 2M-row export running behind a failed test
    assert proc.returncode == 130 and one_line(err) == "recdistill data export: interrupted", err
    assert "Traceback" not in err


# ---- data --------------------------------------------------------------------------------------------------------
def _bad_copy(good: Path, bad: Path, row: int) -> int:
    """Copy the Parquet file `good` to `bad` with row `row`'s hist_cat one event short; returns its sample id."""
    t = pq.read_table(good)
    hist = t.column("hist_cat").to_pylist()
    hist[row] = hist[row][:-1]
    i = t.schema.get_field_index("hist_cat")
    t = t.set_column(i, t.schema.field(i), pa.array(hist, t.schema.field(i).type))
    pq.write_table(t.replace_schema_metadata(pq.read_schema(good).metadata), bad)
    return t.column("sample_id")[row].as_py()


def test_row_faults_named_by_inspect_and_refused_by_demo_before_any_run_dir(tmp_path, capsys):
    data, runs = tmp_path / "pq", tmp_path / "runs"
    assert main(["data", "export", str(data), "--set", "data.num_days=2", "--set", "data.samples_per_day=1500",
                 "--set", "data.history_len=8", "--set", "tracking.progress=false"]) == 0
    day1 = data / "day=1" / "part-00000.parquet"
    # past the sampled rows of each file: only --check-rows reads that far
    sid = _bad_copy(day1, tmp_path / "bad.parquet", row=SAMPLE_ROWS + 10)
    (tmp_path / "bad.parquet").replace(day1)
    capsys.readouterr()
    assert main(["data", "inspect", str(data)]) == 0
    assert f"the first {SAMPLE_ROWS} rows of each file checked, no fault" in capsys.readouterr().out
    assert main(["data", "inspect", str(data), "--check-rows"]) == 1
    out, err = capsys.readouterr()
    assert f"FAULT {day1}: column 'hist_cat' has a different length than 'hist_item' in 1 row(s) (sample_id {sid})" \
        in out
    assert "1 fault(s) in every row" in one_line(err)
    sid = _bad_copy(day1, tmp_path / "bad.parquet", row=3)  # within the sample the demo checks
    (tmp_path / "bad.parquet").replace(day1)
    assert main(["demo", "--set", "data.source=parquet", "--set", f"data.path={data}",
                 "--set", f"tracking.run_dir={runs}"]) == 1
    line = one_line(capsys.readouterr().err)
    assert f"{day1}: column 'hist_cat' has a different length than 'hist_item'" in line and str(sid) in line
    assert f"fix: `recdistill data inspect {data} --check-rows`" in line and not runs.exists()


# ---- signals -----------------------------------------------------------------------------------------------------
def test_verify_fails_on_an_empty_store_and_inspect_names_windows_missing_a_rank(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["signals", "verify", str(tmp_path / "empty")]) == 1
    assert "no committed shard" in capsys.readouterr().out
    uri = str(tmp_path / "store")
    for rank, windows in ((0, [0, 1, 2]), (1, [0, 2])):  # rank 1 never committed window 1
        with SignalWriter(uri, rank, META) as w:
            for win in windows:
                w.begin_window(win)
                ids = ids_of(win, rank)
                w.write(ids, logits_of(ids), step=win)
                w.commit_window()
    assert main(["signals", "inspect", uri]) == 0
    out = capsys.readouterr().out
    assert "missing windows: none" in out and "windows missing a rank: 1 (ranks [1])" in out


# ---- config: presets, demo defaults, run directories -------------------------------------------------------------
def test_preset_loads_underneath_the_users_settings(tmp_path, capsys):
    for name in preset_names():  # each file names itself, so loading it by name is consistent
        assert load_config(PRESETS / f"{name}.yaml").teacher.preset == name
    tiny = load_config(PRESETS / "tiny.yaml")
    cfg = load_config(None, ["teacher.preset=tiny", "teacher.num_layers=3"])
    assert cfg.teacher.model_dump(exclude={"num_layers"}) == tiny.teacher.model_dump(exclude={"num_layers"})
    assert cfg.teacher.num_layers == 3 and cfg.data.history_len == tiny.data.history_len
    user = tmp_path / "u.yaml"
    user.write_text("teacher: {preset: tiny}\ndata: {history_len: 32}\n")
    assert load_config(user).data.history_len == 32
    assert main(["config", "--set", "teacher.preset=nope"]) == 2
    assert "presets: " + ", ".join(preset_names()) in capsys.readouterr().err


def test_demo_config_merges_over_the_demo_defaults():
    demo = load_config(default_config_path())
    cfg, paths = _config(build_parser().parse_args(["demo", "--config", str(PRESETS / "tiny.yaml")]))
    assert paths == [str(default_config_path()), str(PRESETS / "tiny.yaml")]
    assert cfg.data.samples_per_day == demo.data.samples_per_day and cfg.student.beta == demo.student.beta
    assert cfg.teacher == load_config([default_config_path(), PRESETS / "tiny.yaml"]).teacher
    assert cfg.teacher.preset == "tiny"
    assert "merged over configs/demo.yaml" in build_parser()._subparsers._group_actions[0].choices["demo"].format_help()


def test_resume_needs_a_run_directory(tmp_path, capsys):
    assert main(["demo", "--resume", str(tmp_path)]) == 2
    assert f"--resume {tmp_path}: no config.yaml there" in one_line(capsys.readouterr().err)
    assert main(["demo", "--resume", str(tmp_path), "--config", "x.yaml"]) == 2
    assert "--config cannot change it" in capsys.readouterr().err


def test_no_run_reuses_another_runs_directory(tmp_path, capsys):
    old = tmp_path / "d"
    saved = save_config(load_config(None, [f"tracking.run_dir={tmp_path}", "tracking.run_name=d"]), old)
    cfg = load_config(saved)
    fresh = new_run_dir(cfg, [str(saved)], [], "student")
    assert fresh.parent == tmp_path and fresh.name.startswith("student-")
    with pytest.raises(RunError, match="already holds a run"):
        new_run_dir(cfg, [str(saved)], ["tracking.run_name=d"], "student")
    # the real command: a student from the old run's config.yaml writes elsewhere, the old config is untouched
    before = saved.read_text()
    assert main(["student", "--config", str(saved), *SMALL, "--set", "student.tower_loss=task",
                 "--set", "student.towers=single", "--set", "student.export=false",
                 "--set", "tracking.mode=disabled"]) == 0
    assert saved.read_text() == before and not (old / "student.summary.json").exists()
    runs = [p for p in tmp_path.iterdir() if p.name.startswith("student-")]
    assert len(runs) == 1 and (runs[0] / "student.summary.json").exists()
