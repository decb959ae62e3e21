"""`recdistill data export|inspect` through the real CLI entry point (the demo on exported data: tests/test_demo.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recdistill.cli import main
from recdistill.data.parquet import ParquetSource

SMALL = ["--set", "data.num_days=2", "--set", "data.samples_per_day=400", "--set", "data.history_len=16",
         "--set", "tracking.progress=false"]
ROOT = Path(__file__).resolve().parents[2]


def recdistill(*args):
    """`python -m recdistill.cli ...` in a fresh process (the console script's code path)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "recdistill.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


@pytest.mark.multiproc
def test_export_then_inspect_in_a_real_process(tmp_path, capsys):
    out = tmp_path / "pq"
    r = recdistill("data", "export", str(out), "--view", "student", "--days", "1", "--row-group-rows", "150", *SMALL)
    assert r.returncode == 0, r.stderr
    src = ParquetSource(str(out))
    n = src.num_rows(1)
    assert src.days() == [1] and 0 < n < 400  # the student's view keeps a fraction of day 1's 400 rows
    assert f"wrote 1 files, {n} rows (synthetic, view student)" in r.stdout and f"day 1: {n} rows (of 400)" in r.stdout
    files = sorted(out.rglob("*.parquet"))
    assert [f.relative_to(out).as_posix() for f in files] == ["day=1/part-00000.parquet"]
    assert pq.ParquetFile(files[0]).metadata.num_row_groups == 3  # 400 source rows, 150 per group
    assert json.loads(pq.read_schema(files[0]).metadata[b"recdistill.sampling"])["name"] == "student"
    assert main(["data", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    rate = float(src.read(1, 0, n).labels["ctr"].mean())
    assert f"days [1], {n} rows" in text and "ctr (binary)" in text and "watch_time (continuous)" in text
    assert '"name":"student"' in text and "  history: hist_item, hist_cat" in text
    assert "  ground truth: p_true_ctr" in text and "  ids: sample_id, day, traffic" in text
    assert f"day 1: {n} rows, label means ctr={rate:.4f}" in text


@pytest.mark.multiproc
def test_config_and_argument_errors_exit_2_naming_the_key(tmp_path, capsys):
    r = recdistill("data", "export", str(tmp_path / "x"), "--set", "data.samples_per_dya=5")
    assert r.returncode == 2 and "unknown key 'data.samples_per_dya'" in r.stderr
    assert main(["data", "export", str(tmp_path / "x"), "--set", "data.history_len=0"]) == 2
    assert "data.history_len" in capsys.readouterr().err
    assert main(["data", "export", str(tmp_path / "x"), "--days", "7", *SMALL]) == 2
    assert "--days [7] not in the source" in capsys.readouterr().err
    assert main(["data", "export", str(tmp_path / "x"), "--set", "data.source=movielens",
                 "--set", "data.tasks=[{name: watch_time, kind: continuous}]"]) == 2
    assert "data.tasks: MovieLens-100k has no task" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["data", "inspect", str(tmp_path / "missing")]) == 1
    assert "missing: no such directory" in capsys.readouterr().err
