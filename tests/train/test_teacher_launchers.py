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


def check(tmp_path: Path, proc: subprocess.CompletedProcess, summary: str = "sum", sig: str = "sig") -> None:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    sums = [json.loads((tmp_path / f"{summary}.rank{r}.json").read_text()) for r in range(2)]
    assert [s["rank"] for s in sums] == [0, 1] and sums[0]["steps"] == sums[1]["steps"] == 4
    reader = SignalReader(str(tmp_path / sig))
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
def test_torchrun_script_trains(one_node_zero1):
    """The script's run is conftest.py's one_node_zero1 (NPROC=2, LOG_RANK=0,1; test_teacher_scale.py checks it
    too)."""
    root, proc = one_node_zero1
    assert "torch.distributed.run --standalone" in proc.stderr  # the script's own command (its `set -x` trace)
    check(root, proc, summary="one", sig="one-sig")


@pytest.mark.slow
def test_device_teacher_script_quick_mode(tmp_path):
    """launch/device_teacher.sh with QUICK=1: its two teacher runs (the 1b and 7b steps, at the tiny preset on CPU,
    the 7b one under ZeRO-3 + CPU offload) through benchmarks/device_teacher.py, each writing its JSON with the
    measured figures; the GPU-only steps (kernel tests, kernels.bench) are left out on CPU."""
    env = {**os.environ, "QUICK": "1", "OUT": str(tmp_path), "PYTHON": str(ROOT / ".venv" / "bin" / "python")}
    proc = subprocess.run(["bash", str(ROOT / "launch" / "device_teacher.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "exit codes: teacher_1b=0 teacher_7b=0" in proc.stdout
    runs = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("device_teacher-*.json")}
    assert sorted(runs) == ["device_teacher-tiny-cpu.json", "device_teacher-tiny-zero3_offload-cpu.json"]
    for r in runs.values():
        assert r["rc"] == 0 and r["steps"] == 2 and len(r["losses"]) == 2, r
        assert all(x == x for x in r["losses"]) and r["samples_per_s"] > 0 and r["peak_memory_gib"] > 0.1
        assert 0 < r["mfu"] < 1 and r["bf16_matmul_tflops"] > 0
        assert "teacher.embedding_backend=torch" in r["settings"] and "teacher.precision=bf16" in r["settings"]
    assert "teacher.deepspeed=configs/deepspeed/zero3_offload.json" in runs[
        "device_teacher-tiny-zero3_offload-cpu.json"]["settings"]
