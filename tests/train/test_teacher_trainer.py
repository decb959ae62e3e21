"""The teacher trainer under torchrun (2 gloo ranks, DMP + DeepSpeed) writes exactly one committed raw-logit row
per sample it trained on, only for samples of the teacher's view and of the training days."""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from recdistill.config import load_config
from recdistill.data.sampling import keep_mask
from recdistill.signals.reader import SignalReader
from recdistill.signals.schema import COMMITS


@pytest.mark.multiproc
@pytest.mark.parametrize("sharding,zero", [("row_wise", 3), ("table_wise", 2)])
def test_torchrun_teacher_writes_one_row_per_trained_sample(tmp_path, sharding, zero):
    sets = ["data.samples_per_day=1200", "data.num_days=3", "data.batch_size=64", f"signals.uri={tmp_path}/sig",
            "signals.window_steps=4", f"teacher.sharding={sharding}",
            f"teacher.deepspeed=configs/deepspeed/zero{zero}.json", "tracking.mode=disabled",
            f"tracking.run_dir={tmp_path}/runs"]  # W&B off in tests; run directories under tmp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "recdistill.train.teacher", "--config", "configs/teacher/tiny.yaml",
           "--summary", str(tmp_path / "sum"), *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sums = [json.loads((tmp_path / f"sum.rank{r}.json").read_text()) for r in range(2)]
    assert sums[0]["steps"] == sums[1]["steps"] > 4  # ranks agree on the number of steps
    trained = sum(s["trained_samples"] for s in sums)
    reader = SignalReader(str(tmp_path / "sig"), tasks=["ctr", "cvr", "watch_time"])
    assert reader.stats.rows == trained and reader.stats.duplicates == 0 and reader.stats.non_finite_rows == 0
    ids = reader._ids
    cfg = load_config("configs/teacher/tiny.yaml", sets)
    assert reader.meta.sampling == cfg.sampling.teacher and reader.meta.teacher_version == cfg.teacher_digest()
    days = ids >> 40
    assert set(days.tolist()) <= {0, 1}  # day 2 is the evaluation day: never trained, never written
    # every stored sample is one the teacher's view keeps
    from recdistill.data.world import SyntheticWorld

    world = SyntheticWorld(cfg.data)
    for d in (0, 1):
        b = world.read(d, 0, 1200)
        keep = keep_mask(b.sample_id.numpy(), b.labels["ctr"].numpy() > 0.5, b.traffic.numpy(), cfg.sampling.teacher, 3)
        stored = np.isin(b.sample_id.numpy(), ids)
        assert not np.any(stored & ~keep)
    commits = list((tmp_path / "sig" / COMMITS).glob("*.json"))
    assert len(commits) == 2 * len(reader.windows)  # both ranks committed every window
    logits, found = reader.lookup(torch.from_numpy(ids[:5]))
    assert found.all() and logits.shape == (5, 3)


def test_single_process_teacher_through_the_cli(tmp_path, monkeypatch):
    from recdistill.cli import main

    for var in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)  # a lone process: no rendezvous
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(var, "1" if var == "WORLD_SIZE" else "0")  # restored after the test
    code = main(["teacher", "--config", "configs/teacher/tiny.yaml", "--set", "data.samples_per_day=400",
                 "--set", "data.num_days=2", "--set", "data.batch_size=50", "--set", f"signals.uri={tmp_path}/s",
                 "--set", "tracking.mode=disabled", "--set", f"tracking.run_dir={tmp_path}/runs"])
    assert code == 0
    reader = SignalReader(str(tmp_path / "s"))
    assert reader.stats.rows > 0 and reader.stats.rows % 50 == 0 and reader.stats.duplicates == 0
