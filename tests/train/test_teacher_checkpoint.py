"""Crash and resume of the teacher under torchrun (2 gloo ranks, DMP row-wise + DeepSpeed ZeRO-2).

Rank 1 SIGKILLs itself in the middle of a signal window (tests/train/teacher_kill_at.py wraps a trainer method from
the test side: after the step's logits were queued, before its backward), torchrun fails, the same command is run
again and resumes from the checkpoint taken after the last committed window. Then: every sample the teacher trained
on (recomputed from the deterministic loader) has exactly one committed row; the windows committed before the crash
are untouched (same marker bytes, same shard bytes and mtimes); and the resumed run ends bit-identical to a run
without a crash (same eval predictions, same committed logits in every window). Exact equality holds because
everything is deterministic on CPU: fixed data order, fp32, gloo's fixed reduction order, restored optimizer states
(Adam in DeepSpeed's checkpoint, the fused RowWiseAdagrad momentum in DCP); a state left out of the checkpoint shows
up as a mismatch in the windows after the resume.

The data is uneven (rank 0: 12 batches of 64, rank 1: 10, each day's last one partial), so the run takes 12 steps and
rank 1 forwards filler batches at steps 10 and 11. Case `mid_window`: windows of 3, the kill at step 4 (window 1,
after its first step), resume from step 3. Case `exhausted`: windows of 11, the kill at rank 1's filler step 11, resume
from the checkpoint at step 11, which records rank 1 as exhausted after 10 batches: the resumed rank 1 must forward
the same filler (its last real batch) and write nothing, rank 0 trains its last batch. The resume restarts each
rank's loader at its saved (work item, row) position; the 'exhausted' case reads with 2 worker processes per rank,
the run it must equal with none.
"""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from recdistill.config import load_config
from recdistill.data.loader import BatchLoader
from recdistill.data.source import build_source
from recdistill.signals.reader import SignalReader
from recdistill.signals.schema import COMMITS
from recdistill.train.checkpoint import LATEST, META, complete_checkpoints, step_name

TINY_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "teacher" / "tiny.yaml")  # from any cwd
BS = 64
KILL_AT = Path(__file__).with_name("teacher_kill_at.py")
#: (signals.window_steps, step at which rank 1 is killed, data.workers of the crashed and resumed runs; the
#: reference run reads with 0: the batches are the same for any number of workers)
CASES = {"mid_window": (3, 4, 0), "exhausted": (11, 11, 2)}


def sets(root: Path, window: int, workers: int = 0) -> list[str]:
    return ["data.samples_per_day=1200", "data.num_days=3", f"data.batch_size={BS}", f"signals.uri={root}/sig",
            f"data.workers={workers}",
            f"signals.window_steps={window}", "teacher.sharding=row_wise", f"teacher.checkpoint_dir={root}/ckpt",
            "teacher.signal_hidden=4",
            "teacher.checkpoint_every=1", "tracking.mode=disabled", "tracking.progress=false"]


def teacher(root: Path, window: int, kill_at: tuple[int, int] | None = None,
            workers: int = 0) -> subprocess.CompletedProcess:
    """The teacher under torchrun; `kill_at=(rank, step)`: through KILL_AT, which SIGKILLs that rank at that step."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    entry = [str(KILL_AT), f"{kill_at[0]}:{kill_at[1]}"] if kill_at else ["-m", "recdistill.train.teacher"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", *entry,
           "--config", TINY_CONFIG, "--summary", str(root / "sum"),
           "--eval-out", str(root / "eval.npz"), "--run-dir", str(root / "run"),
           *[a for s in sets(root, window, workers) for a in ("--set", s)]]
    env = {**os.environ, "WANDB_MODE": "disabled"}
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


def loader_batches(root: Path, window: int) -> list[list[np.ndarray]]:
    """Each rank's batches (sample ids) of its deterministic loader over the training days: what it must train."""
    cfg = load_config(TINY_CONFIG, sets(root, window))
    src = build_source(cfg.data)
    return [[b.sample_id.numpy() for b in BatchLoader(src, src.days()[:-1], BS, view=cfg.sampling.teacher, rank=r,
                                                       world_size=2, prefetch=0)] for r in range(2)]


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_then_resume_matches_a_run_without_crash(tmp_path, case):
    window, kill_step, workers = CASES[case]
    ref, crash = tmp_path / "ref", tmp_path / "crash"
    per_rank = loader_batches(crash, window)
    steps = max(map(len, per_rank))
    assert len(per_rank[1]) < kill_step < steps or case == "mid_window"  # 'exhausted': killed on a filler step
    done = teacher(ref, window)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = teacher(crash, window, kill_at=(1, kill_step), workers=workers)
    assert killed.returncode != 0, "torchrun should fail when rank 1 is SIGKILLed"
    assert "Signals.SIGKILL" in killed.stderr or "exitcode  : -9" in killed.stderr, killed.stderr[-3000:]
    before = store_state(crash / "sig")
    before_hidden = store_state(crash / "sig.hidden")
    assert sorted(before_hidden) == sorted(before)  # committed with the logits' windows
    # Window 0 is committed by both ranks; window 1 (open at the kill) by neither: the surviving rank 0 fails in
    # the next collective and leaves without committing its partial window.
    assert sorted(before) == ["window=0.rank=0.json", "window=0.rank=1.json"], sorted(before)
    assert [d.name for d in complete_checkpoints(crash / "ckpt")] == [step_name(window)]
    assert (crash / "ckpt" / LATEST).read_text().strip() == step_name(window)
    position = [json.loads((crash / "ckpt" / step_name(window) / f"rank{r}.json").read_text()) for r in range(2)]
    # the per-rank data position: real batches taken (rank 1 has run out in the 'exhausted' case)
    assert [(p["batches"], p["exhausted"]) for p in position] == [
        (min(window, len(b)), window > len(b)) for b in per_rank]
    assert all(p["position"] is not None and p["last"] is not None for p in position)  # the O(1) resume point

    resumed = teacher(crash, window, workers=workers)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    sums = [json.loads((crash / f"sum.rank{r}.json").read_text()) for r in range(2)]
    ref_sums = [json.loads((ref / f"sum.rank{r}.json").read_text()) for r in range(2)]
    assert [s["resumed_from_step"] for s in sums] == [window, window]
    assert sums[0]["steps"] == sums[1]["steps"] == ref_sums[0]["steps"] == steps > kill_step
    assert all(s["signals/rows_dropped_committed"] == 0 for s in sums)  # nothing committed was replayed

    # exactly one committed row per sample of every rank's loader (partial batches included), none for padding
    reader = SignalReader(str(crash / "sig"))
    want_ids = np.sort(np.concatenate([ids for rank in per_rank for ids in rank]))
    trained = sum(s["trained_samples"] for s in sums)
    assert reader.stats.rows == trained == len(want_ids) and reader.stats.duplicates == 0
    np.testing.assert_array_equal(np.sort(reader.sample_ids), want_ids)

    # committed windows from before the crash: untouched (marker bytes, shard bytes, shard mtimes)
    after = store_state(crash / "sig")
    assert {k: after[k] for k in before} == before
    # the representations (teacher.signal_hidden): the same, one row per trained sample, the old windows untouched
    assert {k: v for k, v in store_state(crash / "sig.hidden").items() if k in before} == before_hidden
    hidden = SignalReader(str(crash / "sig.hidden"))
    assert hidden.stats.rows == trained and hidden.stats.duplicates == 0
    np.testing.assert_array_equal(np.sort(hidden.sample_ids), want_ids)
    ids = torch.from_numpy(want_ids)
    torch.testing.assert_close(hidden.lookup(ids), SignalReader(str(ref / "sig.hidden")).lookup(ids), rtol=0, atol=0)

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

    kept = complete_checkpoints(crash / "ckpt")  # one after each window and one at the end: the newest two kept
    assert [d.name for d in kept] == [step_name(s) for s in sorted({*range(window, steps + 1, window), steps})[-2:]]
    assert (crash / "ckpt" / LATEST).read_text().strip() == kept[-1].name
    meta = json.loads((kept[-1] / META).read_text())
    assert meta["steps"] == steps and meta["world_size"] == 2
    final = [json.loads((kept[-1] / f"rank{r}.json").read_text()) for r in range(2)]
    # every batch taken; a rank with fewer batches than steps is exhausted (the one with most may not know yet when
    # the last checkpoint falls on a window end, before the loop's final look at the loader)
    assert [p["batches"] for p in final] == [len(b) for b in per_rank]
    assert all(p["exhausted"] for p, b in zip(final, per_rank, strict=True) if len(b) < steps)


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    """teacher.checkpoint_keep: the newest `keep` complete checkpoints stay, older ones and incomplete ones older
    than the newest complete one go; an incomplete one newer than it (a save in progress) is never touched."""
    from recdistill.train.checkpoint import prune

    for step in (1, 2, 3, 4, 5):
        d = tmp_path / step_name(step)
        d.mkdir()
        if step != 2:
            (d / META).write_text("{}")
    (tmp_path / step_name(6)).mkdir()  # being written right now
    gone = prune(tmp_path, keep=3)
    assert sorted(p.name for p in gone) == [step_name(1), step_name(2)]
    assert [p.name for p in complete_checkpoints(tmp_path)] == [step_name(s) for s in (3, 4, 5)]
    assert (tmp_path / step_name(6)).is_dir()
    assert [p.name for p in prune(tmp_path, keep=1)] == [step_name(3), step_name(4)]
    with pytest.raises(ValueError, match="keep=0"):
        prune(tmp_path, keep=0)


def test_resumed_teacher_continues_its_wandb_run_and_metrics(tmp_path, monkeypatch):
    """One process, the real entry point twice: 2 steps with a checkpoint, then teacher.steps=4 resumes from it.
    The resumed run logs into the first run's directory (no --run-dir, no run name: the default directory has a
    timestamp, the checkpoint names it), continues the same W&B run id, and appends to its metrics.jsonl."""
    from recdistill.train.teacher import main

    for var in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(var, "1" if var == "WORLD_SIZE" else "0")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    runs = tmp_path / "runs"
    base = ["data.samples_per_day=300", "data.num_days=3", f"data.batch_size={BS}", "signals.window_steps=2",
            f"signals.uri={tmp_path}/sig", f"teacher.checkpoint_dir={tmp_path}/ckpt", "teacher.log_every=1",
            f"tracking.run_dir={runs}", "tracking.mode=offline", "tracking.progress=false"]
    for steps in (2, 4):
        argv = ["--config", TINY_CONFIG, "--summary", str(tmp_path / f"sum{steps}"),
                *[a for s in [*base, f"teacher.steps={steps}"] for a in ("--set", s)]]
        assert main(argv) == 0
    assert json.loads((tmp_path / "sum4.rank0.json").read_text())["resumed_from_step"] == 2
    (run_dir,) = runs.iterdir()  # the resumed run opened no directory of its own
    run_id = json.loads((tmp_path / "ckpt" / step_name(4) / META).read_text())["tracking"]["wandb_run_id"]
    assert run_id and json.loads((tmp_path / "ckpt" / step_name(2) / META).read_text())["tracking"] == {
        "run_dir": str(run_dir.resolve()), "wandb_run_id": run_id}
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    # W&B names a run's directory offline-run-<second>-<id>; when both starts fall in the same second the second
    # directory gets a "-1" suffix, so the id is matched with that optional suffix.
    assert len(offline) == 2 and all(re.search(rf"-{run_id}(-\d+)?$", d.name) for d in offline), offline
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x.get("step", "summary") for x in lines] == [1, 2, "summary", 3, 4, "summary"]
