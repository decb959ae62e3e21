"""Fixtures of the trainer tests: 2-rank torchrun teacher runs shared by the tests that check them.

A torchrun run of the teacher costs most of its time in start-up (two ranks importing torch, TorchRec and
DeepSpeed), so one run serves every test that checks a different aspect of the same kind of run:
test_teacher_trainer.py (one committed row per trained sample, uneven ranks) and test_teacher_eval.py (every eval
sample once, the logged metrics) check the same table-wise / ZeRO-2 run; test_teacher_launchers.py (through
launch/teacher_torchrun.sh) and test_teacher_scale.py (ZeRO-1 trains; two nodes of one rank equal one node of two)
the same short ZeRO-1 run. Likewise the sharded-step cases of test_parallel_teacher.py and test_teacher_scale.py
run on one pair of spawned ranks (sharded_steps).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_workers import CFG, free_port, spawn_steps
from helpers import SCHEMA, ZERO1_SETS

from recdistill.config import TeacherConfig
from recdistill.models.teacher import TeacherModel

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = str(ROOT / "configs" / "teacher" / "tiny.yaml")  # from any cwd

#: The data is uneven over the ranks: 1200 rows a day in chunks of 256 (rank 0 gets 3 chunks, rank 1 two, the last
#: one short; after sampling 12 and 10 batches of 64, with a partial last batch every day on both ranks), and the
#: eval day too (rank 0: 688 rows, 11 batches, the last partial; rank 1: 512, 8 batches). The teacher's view has a
#: correction that varies by traffic; metrics are logged every 3 steps; 8 columns of its representation are written.
TEACHER_SETS = ["data.samples_per_day=1200", "data.num_days=3", "data.batch_size=64", "signals.window_steps=4",
                "teacher.log_every=3", "tracking.mode=disabled", "tracking.progress=false", "teacher.signal_hidden=8",
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


@pytest.fixture(scope="session")
def sharded_steps(request) -> tuple[dict, dict]:
    """(the initial state, {case: {rank: result}}) for the sharded-step cases of this session's selected tests: each
    test module that has them names its own in a module-level `sharded_step_cases(items)` (test_parallel_teacher.py,
    test_teacher_scale.py), and all of them run one after another on one pair of spawned ranks (spawn_steps: the
    ranks' start-up, most of a case's time on CPU, is paid once a session, not once a module)."""
    items = request.session.items
    modules = dict.fromkeys(m for m in (getattr(i, "module", None) for i in items) if hasattr(m, "sharded_step_cases"))
    cases = {}
    for module in modules:
        cases.update(module.sharded_step_cases([i for i in items if getattr(i, "module", None) is module]))
    torch.manual_seed(0)
    init = TeacherModel(SCHEMA, TeacherConfig(**CFG)).state_dict()
    return init, spawn_steps(cases, init)
