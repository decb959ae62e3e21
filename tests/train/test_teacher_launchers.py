"""The teacher under the DeepSpeed launcher (which appends --local_rank=N to the module's arguments) and through
launch/teacher_torchrun.sh, 2 CPU ranks each, a few steps: both must finish and write one row per trained sample."""

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from recdistill.signals.reader import SignalReader

ROOT = Path(__file__).resolve().parents[2]
SETS = ["data.samples_per_day=600", "data.num_days=2", "data.batch_size=32", "teacher.steps=4",
        "tracking.mode=disabled", "tracking.progress=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(tmp_path: Path, proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    sums = [json.loads((tmp_path / f"sum.rank{r}.json").read_text()) for r in range(2)]
    assert [s["rank"] for s in sums] == [0, 1] and sums[0]["steps"] == sums[1]["steps"] == 4
    reader = SignalReader(str(tmp_path / "sig"))
    assert reader.stats.rows == sum(s["trained_samples"] for s in sums) == 2 * 4 * 32
    assert reader.stats.duplicates == 0


def args(tmp_path: Path) -> list[str]:
    sets = [*SETS, f"signals.uri={tmp_path}/sig", f"tracking.run_dir={tmp_path}/runs"]
    return ["--summary", str(tmp_path / "sum"), *[a for s in sets for a in ("--set", s)]]


@pytest.mark.slow
@pytest.mark.multiproc
def test_deepspeed_launcher_passes_local_rank_and_trains(tmp_path):
    deepspeed = ROOT / ".venv" / "bin" / "deepspeed"
    if not deepspeed.exists():
        pytest.skip("no .venv/bin/deepspeed")
    env = {**os.environ, "MASTER_PORT": str(free_port()), "NPROC": "2", "DEEPSPEED": str(deepspeed),
           "WANDB_MODE": "disabled"}
    proc = subprocess.run(["bash", str(ROOT / "launch" / "teacher_deepspeed.sh"), *args(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=180)
    assert "--local_rank=" in proc.stdout + proc.stderr  # the launcher's spawn line: the argument was really passed
    check(tmp_path, proc)
    for r in range(2):  # the launcher's LOCAL_SIZE, TorchRec's ranks per node
        assert json.loads((tmp_path / f"sum.rank{r}.json").read_text())["local_world_size"] == 2


@pytest.mark.slow
@pytest.mark.multiproc
def test_torchrun_script_trains(tmp_path):
    env = {**os.environ, "NPROC": "2", "LOG_RANK": "0,1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(["bash", str(ROOT / "launch" / "teacher_torchrun.sh"), *args(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=180)
    check(tmp_path, proc)
