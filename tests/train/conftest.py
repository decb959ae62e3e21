"""Fixtures of the trainer tests: 2-rank torchrun teacher runs shared by the tests that check them.

A torchrun run of the teacher costs most of its time in start-up (two ranks importing torch, TorchRec and
DeepSpeed), so one run serves every test that checks a different aspect of the same kind of run:
test_teacher_trainer.py (one committed row per trained sample, uneven ranks) and test_teacher_eval.py (every eval
sample once, the logged metrics) check the same table-wise / ZeRO-2 run; test_teacher_launchers.py (through
launch/teacher_torchrun.sh) and test_teacher_scale.py (ZeRO-1 trains; two nodes of one rank equal one node of two)
the same short ZeRO-1 run.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist_workers import free_port
from helpers import ZERO1_SETS

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = str(ROOT / "configs" / "teacher" / "tiny.yaml")  # from any cwd

#: The data is uneven over the ranks: 1200 rows a day in chunks of 256 (rank 0 gets 3 chunks, rank 1 two, the last
#: one short; after sampling 12 and 10 batches of 64, with a partial last batch every day on both ranks), and the
#: eval day too (rank 0: 688 rows, 11 batches, the last partial; rank 1: 512, 8 batches). The teacher's view has a
#: correction that varies by traffic; metrics are logged every 3 steps.
TEACHER_SETS = ["data.samples_per_day=1200", "data.num_days=3", "data.batch_size=64", "signals.window_steps=4",
                "teacher.log_every=3", "tracking.mode=disabled", "tracking.progress=false",
                "sampling.teacher={name: teacher, r: 0.5, q_eff: [0.9, 0.6, 0.3]}"]


def teacher_sets(root: Path, sharding: str, zero: int) -> list[str]:
    return [*TEACHER_SETS, f"signals.uri={root}/sig", f"teacher.sharding={sharding}",
            f"teacher.deepspeed=configs/deepspeed/zero{zero}.json"]


@pytest.fixture(scope="session")
def torchrun_teacher(tmp_path_factory):
    """run(sharding, zero) -> (root, the run's --set overrides): the real trainer under torchrun on 2 gloo ranks,
    once per (sharding, zero) in a session, asserted to have finished. Under root: sig/ (the signal store),
    sum.rank{r}.json (--summary), eval.npz (--eval-out), run/ (--run-dir: metrics.jsonl, config.yaml)."""
    done = {}

    def run(sharding: str, zero: int) -> tuple[Path, list[str]]:
        if (sharding, zero) not in done:
            root = tmp_path_factory.mktemp(f"teacher-{sharding}-zero{zero}")
            sets = teacher_sets(root, sharding, zero)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                   "-m", "recdistill.train.teacher", "--config", TINY_CONFIG, "--summary", str(root / "sum"),
                   "--eval-out", str(root / "eval.npz"), "--run-dir", str(root / "run"),
                   *[a for s in sets for a in ("--set", s)]]
            env = {**os.environ, "WANDB_MODE": "disabled"}
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
            done[sharding, zero] = (root, sets, proc)
        root, sets, proc = done[sharding, zero]
        assert proc.returncode == 0, proc.stderr[-3000:]
        return root, sets

    return run


@pytest.fixture(scope="session")
def one_node_zero1(tmp_path_factory):
    """(root, the script's CompletedProcess): ZERO1_SETS through launch/teacher_torchrun.sh (NPROC=2, both ranks'
    output shown), once a session, asserted to have finished. Under root: one.rank{r}.json (--summary),
    one-sig/ (the signal store), one-eval.npz (--eval-out), runs/."""
    root = tmp_path_factory.mktemp("one_node_zero1")
    sets = [*ZERO1_SETS, f"signals.uri={root}/one-sig", f"tracking.run_dir={root}/runs"]
    env = {**os.environ, "NPROC": "2", "LOG_RANK": "0,1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(["bash", str(ROOT / "launch" / "teacher_torchrun.sh"), "--summary", str(root / "one"),
                           "--eval-out", str(root / "one-eval.npz"), *[a for s in sets for a in ("--set", s)]],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return root, proc
