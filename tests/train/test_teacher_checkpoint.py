"""Crash and resume of the teacher under torchrun (2 gloo ranks, DMP row-wise + DeepSpeed ZeRO-2).

Rank 1 SIGKILLs itself in the middle of a signal window (the trainer's RECDISTILL_TEST_KILL_AT hook: after the
step's logits were queued, before its backward), torchrun fails, the same command is run again and resumes from
the checkpoint taken after the last committed window. Then: every sample the teacher trained on (recomputed from
the deterministic loader) has exactly one committed row; the windows committed before the crash are untouched
(same marker bytes, same shard bytes and mtimes); and the resumed run ends bit-identical to a run without a crash
(same eval predictions, same committed logits in every window). Exact equality holds because everything is
deterministic on CPU: fixed data order, fp32, gloo's fixed reduction order, restored optimizer states (Adam in
DeepSpeed's checkpoint, the fused RowWiseAdagrad momentum in DCP); a state left out of the checkpoint shows up as
a mismatch in the windows after the resume.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from recdistill.config import load_config
from recdistill.data.loader import BatchLoader, build_source
from recdistill.signals.reader import SignalReader
from recdistill.signals.schema import COMMITS
from recdistill.train.checkpoint import LATEST, META, complete_checkpoints, step_name

BS, WINDOW, KILL_STEP = 64, 3, 4  # windows [0,1,2] [3,4,5] [6,7]: the kill is in window 1, after its first step


def sets(root: Path) -> list[str]:
    return ["data.samples_per_day=1200", "data.num_days=3", f"data.batch_size={BS}", f"signals.uri={root}/sig",
            f"signals.window_steps={WINDOW}", "teacher.sharding=row_wise", f"teacher.checkpoint_dir={root}/ckpt",
            "teacher.checkpoint_every=1", "tracking.mode=disabled", "tracking.progress=false"]


def teacher(root: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "recdistill.train.teacher", "--config", "configs/teacher/tiny.yaml", "--summary", str(root / "sum"),
           "--eval-out", str(root / "eval.npz"), "--run-dir", str(root / "run"),
           *[a for s in sets(root) for a in ("--set", s)]]
    base = {k: v for k, v in os.environ.items() if k != "RECDISTILL_TEST_KILL_AT"}
    env = {**base, "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


def store_state(sig: Path) -> dict[str, tuple]:
    """Every committed (window, rank): its marker's bytes and its shard's hash and mtime."""
    out = {}
    for marker in sorted((sig / COMMITS).glob("*.json")):
        window, rank = (int(part.split("=")[1]) for part in marker.stem.split("."))
        shard = sig / f"window={window}" / f"rank={rank}.arrow"
        digest = hashlib.sha256(shard.read_bytes()).hexdigest()
        out[marker.name] = (marker.read_bytes(), digest, shard.stat().st_mtime_ns)
    return out


def trained_ids(root: Path, steps: int) -> np.ndarray:
    """The sample ids the teacher trained on: the first `steps` batches of each rank's deterministic loader."""
    cfg = load_config("configs/teacher/tiny.yaml", sets(root))
    src = build_source(cfg.data)
    ids = []
    for rank in range(2):
        loader = BatchLoader(src, src.days()[:-1], BS, view=cfg.sampling.teacher, rank=rank, world_size=2,
                             prefetch=0, drop_last=True)
        for step, batch in enumerate(loader):
            if step == steps:
                break
            ids.append(batch.sample_id.numpy())
    return np.sort(np.concatenate(ids))


@pytest.mark.multiproc
def test_sigkill_mid_window_then_resume_matches_a_run_without_crash(tmp_path):
    ref, crash = tmp_path / "ref", tmp_path / "crash"
    done = teacher(ref)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = teacher(crash, env={"RECDISTILL_TEST_KILL_AT": f"1:{KILL_STEP}"})
    assert killed.returncode != 0, "torchrun should fail when rank 1 is SIGKILLed"
    before = store_state(crash / "sig")
    # Window 0 is committed by both ranks; window 1 (open at the kill) by neither: the surviving rank 0 fails in
    # the next collective and leaves without committing its partial window.
    assert sorted(before) == ["window=0.rank=0.json", "window=0.rank=1.json"], sorted(before)
    assert [d.name for d in complete_checkpoints(crash / "ckpt")] == [step_name(WINDOW)]
    assert (crash / "ckpt" / LATEST).read_text().strip() == step_name(WINDOW)

    resumed = teacher(crash)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    sums = [json.loads((crash / f"sum.rank{r}.json").read_text()) for r in range(2)]
    ref_sums = [json.loads((ref / f"sum.rank{r}.json").read_text()) for r in range(2)]
    assert [s["resumed_from_step"] for s in sums] == [WINDOW, WINDOW]
    assert sums[0]["steps"] == sums[1]["steps"] == ref_sums[0]["steps"] > KILL_STEP + WINDOW
    assert all(s["signals/rows_dropped_committed"] == 0 for s in sums)  # nothing committed was replayed

    # exactly one committed row per trained sample, and the trained samples are the loader's first `steps` batches
    reader = SignalReader(str(crash / "sig"))
    trained = sum(s["trained_samples"] for s in sums)
    assert reader.stats.rows == trained == 2 * sums[0]["steps"] * BS and reader.stats.duplicates == 0
    np.testing.assert_array_equal(np.sort(reader.sample_ids), trained_ids(crash, sums[0]["steps"]))

    # committed windows from before the crash: untouched (marker bytes, shard bytes, shard mtimes)
    after = store_state(crash / "sig")
    assert {k: after[k] for k in before} == before

    # bit-identical to the run without a crash: final model (eval predictions) and every committed logit
    got, want = np.load(crash / "eval.npz"), np.load(ref / "eval.npz")
    assert sorted(got.files) == sorted(want.files)
    for key in want.files:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f"eval.npz {key}")
    # (rows, not file bytes: the file metadata holds the teacher version, a digest of a config whose paths differ)
    assert sorted(after) == sorted(store_state(ref / "sig"))
    for name in after:
        window, rank = (int(part.split("=")[1]) for part in name.removesuffix(".json").split("."))
        mine, theirs = (pa.ipc.open_file(pa.memory_map(str(r / "sig" / f"window={window}" / f"rank={rank}.arrow")))
                        .read_all().replace_schema_metadata() for r in (crash, ref))
        assert mine.equals(theirs), f"committed rows of window {window} rank {rank} differ from the run without a crash"

    kept = complete_checkpoints(crash / "ckpt")  # after windows 1 and 2 and the end: the newest two are kept
    assert [d.name for d in kept] == [step_name(2 * WINDOW), step_name(sums[0]["steps"])]
    assert (crash / "ckpt" / LATEST).read_text().strip() == kept[-1].name
    meta = json.loads((kept[-1] / META).read_text())
    assert meta["steps"] == sums[0]["steps"] and meta["world_size"] == 2
