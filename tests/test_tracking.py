"""Tracker against a real offline W&B run (its record file read back), metrics.jsonl, rank gating, progress."""

import json
import math
import struct
import time

import pytest
import torch
from wandb.proto import wandb_internal_pb2

from recdistill.config import TrackingConfig
from recdistill.tracking import Tracker, console, progress, read_metrics


def wandb_records(path):
    """Records of a W&B transaction log (.wandb): a 7-byte header, then LevelDB-style 32 KiB blocks of chunks with a
    7-byte header each (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last; 0 padding)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            yield rec


def test_offline_wandb_run_lives_in_run_dir(tmp_path, monkeypatch):
    # the environment wins over the config: cfg says disabled, WANDB_MODE says offline
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    run_dir = tmp_path / "runs" / "r1"
    (tmp_path / "runs").mkdir()
    extra = tmp_path / "runs" / "notes.txt"
    extra.write_text("hello")
    with pytest.raises(RuntimeError, match="boom"), Tracker(TrackingConfig(mode="disabled"), run_dir, {"a": 1}) as t:
        for step in range(3):
            t.log({"loss/train": 1.0 / (step + 1), "auc/ctr": torch.tensor(0.5 + step / 10)}, step=step)
        t.summary({"auc/ctr": 0.7, "ne/ctr": float("nan")})
        t.save_file(extra)
        wandb_dir = t.wandb_dir
        raise RuntimeError("boom")  # the context manager still closes the run, with exit code 1

    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline == [wandb_dir]
    assert (wandb_dir / "files" / "notes.txt").read_text() == "hello"
    (log,) = wandb_dir.glob("run-*.wandb")
    recs = list(wandb_records(log))
    def items(entries):  # a key with a '/' comes as nested_key
        return {e.key or "/".join(e.nested_key): json.loads(e.value_json) for e in entries}

    history = {r.history.step.num: items(r.history.item) for r in recs if r.WhichOneof("record_type") == "history"}
    assert sorted(history) == [0, 1, 2]
    assert history[2]["loss/train"] == pytest.approx(1 / 3) and history[2]["auc/ctr"] == pytest.approx(0.7)
    (run,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    assert items(run.config.update)["a"] == 1 and run.display_name == "r1"
    summaries = [items(r.summary.update) for r in recs if r.WhichOneof("record_type") == "summary"]
    assert {"auc/ctr": 0.7, "ne/ctr": None} in summaries  # W&B writes NaN as null too
    assert [r.exit.exit_code for r in recs if r.WhichOneof("record_type") == "exit"] == [1]

    records, summary = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[2]["auc/ctr"] == pytest.approx(0.7) and records[0]["loss/train"] == 1.0
    assert summary == {"auc/ctr": 0.7, "ne/ctr": None}  # NaN is null in JSON


def test_env_disabled_wins_and_jsonl_appends(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for run in range(2):  # a resumed run appends to the same file
        t = Tracker(TrackingConfig(mode="offline"), tmp_path / "a")
        assert t.wandb_dir is None
        t.log({"x": run, "inf/y": float("inf")}, step=run)
        t.finish()
        t.finish()  # idempotent
    assert not (tmp_path / "a" / "wandb").exists()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["metrics.jsonl"]
    records, summary = read_metrics(tmp_path / "a")
    inf = float("inf")  # written as the string 'inf' (JSON has none), read back as a float
    assert [(r["step"], r["x"], r["inf/y"]) for r in records] == [(0, 0, inf), (1, 1, inf)] and summary == {}


def test_other_ranks_write_and_print_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it; no rank argument given
    t = Tracker(TrackingConfig(mode="offline"), tmp_path / "b")
    t.log({"x": 1}, step=0)
    t.summary({"x": 1})
    t.save_file(tmp_path / "missing.txt")
    t.finish()
    console("hidden")
    assert list(progress(range(3), desc="hidden")) == [0, 1, 2]
    assert not (tmp_path / "b").exists()
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    console("shown", rank=0)  # an explicit rank overrides the environment
    assert capsys.readouterr().out == "shown\n"


def test_progress_bar_on_rank0_and_manual_bar(capsys):
    assert list(progress(range(4), desc="bar", rank=0)) == [0, 1, 2, 3]
    err = capsys.readouterr().err
    assert "bar" in err and "4/4" in err
    assert list(progress(range(4), desc="off", rank=0, enabled=False)) == [0, 1, 2, 3]
    assert capsys.readouterr().err == ""
    bar = progress(total=10, desc="steps", rank=0, unit="step")
    bar.update(6)
    bar.set_postfix(loss=0.5)
    bar.close()
    assert "6/10" in capsys.readouterr().err
    quiet = progress(total=10, rank=3)  # the same calls are no-ops elsewhere
    quiet.update(6)
    quiet.close()
    assert capsys.readouterr().err == ""
    assert math.isclose(bar.n, 6)


def test_resume_id_continues_the_wandb_run_and_metrics(tmp_path, monkeypatch):
    """A second attempt of a job passes the first one's run id: the same W&B run id (offline: a second
    offline-run-*-<id> directory, joined by `wandb sync`), and metrics.jsonl continues."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = Tracker(TrackingConfig(mode="offline"), tmp_path / "r")
    first.log({"x": 0}, step=0)
    run_id = first.run_id
    first.finish()
    fresh = Tracker(TrackingConfig(mode="offline"), tmp_path / "other")  # without resume_id: a new run
    assert fresh.run_id != run_id
    fresh.finish()
    second = int(time.time())
    while int(time.time()) == second:  # offline run directories are named to the second
        time.sleep(0.05)
    again = Tracker(TrackingConfig(mode="offline"), tmp_path / "r", resume_id=run_id)
    assert again.run_id == run_id and again.wandb_dir.name.endswith(f"-{run_id}")
    again.log({"x": 1}, step=1)
    again.finish()
    dirs = sorted((tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and all(d.name.endswith(f"-{run_id}") for d in dirs)
    records, _ = read_metrics(tmp_path / "r")
    assert [(r["step"], r["x"]) for r in records] == [(0, 0), (1, 1)]
