"""The streaming experiment's runner in quick mode: `recdistill experiment --streaming` with
configs/experiments/streaming.yaml, scaled down (one streaming day) and on the demo's 2 teacher ranks: a real torchrun
batch teacher, students with checkpoints, then the streaming phase under torchrun with the real local stream backend,
joiner, the 2-rank streaming teacher (rank 0 driving) and students. The same math on one process:
tests/train/test_stream_teacher_ranks.py."""

import json
from pathlib import Path

import pytest

from recdistill.cli import main
from recdistill.signals.reader import SignalReader

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(ROOT / "configs" / "experiments" /
                                                                        "streaming.yaml"),
         "--config", str(ROOT / "configs" / "teacher" / "tiny.yaml"),
         "--set", "data.num_days=4", "--set", "stream.days=1", "--set", "data.samples_per_day=2000",
         "--set", "data.batch_size=64", "--set", "data.history_len=32", "--set", "student.history_len=8",
         "--set", "data.world.num_users=300", "--set", "data.world.num_items=400", "--set", "student.export=false",
         "--set", "tracking.progress=false", "--set", "student.checkpoint_every=5",
         "--set", "experiment.teacher_procs=2"]


@pytest.mark.slow
@pytest.mark.multiproc
def test_streaming_experiment_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(["experiment", "--streaming", *QUICK, "--set", f"tracking.run_dir={tmp_path}",
                 "--set", "tracking.run_name=s"]) == 0
    run = tmp_path / "s"
    out = json.loads((run / "stream" / "stream_summary.json").read_text())
    assert out["ranks"] == 2
    (day,) = out["days"]
    assert (day["day"], day["eval_day"]) == (2, 3)
    for name in ("teacher", "base", "a_stream_distill", "b_stream_labels", "c_frozen", "d_stream_only"):
        assert 0.0 < day[f"{name}/auc/ctr"] < 1.0, name
    assert "c_frozen/stream/trained" not in day  # scored, never trained
    trained = {n: day[f"{n}/stream/trained"] for n in ("base", "a_stream_distill", "b_stream_labels", "d_stream_only")}
    assert len(set(trained.values())) == 1 and trained["base"] > 0  # one joined stream, the same view
    # counts reconcile end to end: every sample the teacher trained published a signal, which joined or came late
    # (whole chunks of 4 global batches, and the day's short last batch trained before the joiner looks: none late)
    j, t = out["join"], out["teacher"]
    assert t["teacher/stream/trained"] == t["teacher/stream/published"] == j["join/signals_in"] == j["join/samples_in"]
    assert j["join/joined"] + j["join/expired"] == j["join/samples_in"] and j["join/late"] == j["join/expired"]
    assert j["join/join_rate"] == 1.0 and j["join/duplicate_samples"] == j["join/duplicate_signals"] == 0
    assert j["join/samples_in"] == day["base/stream/polled"]  # every joined row reached every student
    # the streaming teacher's own store, and what the distilling students consumed, in the batch store layout
    assert SignalReader(str(run / "stream" / "signals")).stats.rows == t["teacher/stream/published"]
    assert {p.name for p in (run / "stream" / "signals").glob("window=*/rank=*.arrow")} == {"rank=0.arrow",
                                                                                        "rank=1.arrow"}
    for name in ("a_stream_distill", "d_stream_only"):
        assert SignalReader(str(run / "stream" / f"{name}.signals")).stats.rows == day[f"{name}/stream/with_signal"]
    report = (run / "stream" / "report.md").read_text()
    assert "Gain over `base`" in report and "| join/join_rate |" in report


def test_stream_phase_refuses_a_batch_run_it_cannot_continue_before_any_rank_starts(tmp_path):
    from recdistill.config import load_config
    from recdistill.errors import UsageError
    from recdistill.stream_phase import run_stream_phase

    cfg = load_config([str(ROOT / "configs" / "demo.yaml")],
                      ["data.num_days=4", "stream.days=1", "data.samples_per_day=2000", "data.history_len=32"])
    batch = tmp_path / "run"
    with pytest.raises(UsageError, match="no teacher checkpoint under"):
        run_stream_phase(cfg, batch)
    ck = batch / "teacher_ckpt" / "step=000000004"
    ck.mkdir(parents=True)
    (ck / "meta.json").write_text(json.dumps({"world_size": 2, "step": 4}))
    with pytest.raises(UsageError, match="student 'base' has no batch-phase checkpoint under"):
        run_stream_phase(cfg, batch)
    assert not (batch / "stream").exists()  # refused before anything was made or launched
