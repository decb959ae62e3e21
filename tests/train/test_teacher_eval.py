"""The teacher's next-day evaluation and its logging.

Under torchrun (2 gloo ranks) the eval day splits unevenly (1200 rows in chunks of 256: rank 0 gets 688 rows, 11
batches of which the last is partial; rank 1 gets 512, 8 batches), so the padded batches and the filler batches
of a finished rank are exercised: every eval sample must come back exactly once, with its own label and ground
truth, and the summary's metrics must be the metrics of those rows on both ranks.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from recdistill.config import load_config
from recdistill.data.world import SyntheticWorld
from recdistill.distill.metrics import auc, ne
from recdistill.tracking import read_metrics

TINY_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "teacher" / "tiny.yaml")  # from any cwd

SETS = ["data.samples_per_day=1200", "data.num_days=3", "data.batch_size=64", "signals.window_steps=4",
        "teacher.log_every=3", "tracking.mode=disabled",
        "sampling.teacher={name: teacher, r: 0.5, q_eff: [0.9, 0.6, 0.3]}"]  # a correction that varies by traffic


@pytest.mark.slow
@pytest.mark.multiproc
def test_torchrun_eval_counts_every_eval_sample_once_and_logs(torchrun_teacher):
    """The table-wise / ZeRO-2 run of conftest.torchrun_teacher (the tiny preset's; test_teacher_trainer.py checks
    its committed rows): these data, log_every and sampling settings."""
    root, sets = torchrun_teacher("table_wise", 2)
    assert set(SETS) <= set(sets)
    world = SyntheticWorld(load_config(TINY_CONFIG, sets).data)
    day = world.read(2, 0, 1200)
    order = np.argsort(day.sample_id.numpy())
    got = np.load(root / "eval.npz")
    np.testing.assert_array_equal(got["sample_id"], day.sample_id.numpy()[order])  # all of day 2, once each
    for task in ("ctr", "cvr", "watch_time"):
        np.testing.assert_array_equal(got[f"label_{task}"], day.labels[task].numpy()[order], err_msg=task)
        np.testing.assert_array_equal(got[f"p_true_{task}"], day.p_true[task].numpy()[order], err_msg=task)
    assert ((got["pred_ctr"] > 0) & (got["pred_ctr"] < 1)).all() and (got["pred_watch_time"] > -1).all()

    sums = [json.loads((root / f"sum.rank{r}.json").read_text()) for r in range(2)]
    evals = [{k: v for k, v in s.items() if k.startswith("eval/")} for s in sums]
    assert evals[0] == evals[1] and evals[0]["eval/samples"] == 1200
    y, p = torch.from_numpy(got["label_ctr"]), torch.from_numpy(got["pred_ctr"])
    assert math.isclose(evals[0]["eval/auc/ctr"], auc(y, p), rel_tol=1e-12)
    assert math.isclose(evals[0]["eval/ne/ctr"], ne(y, p), rel_tol=1e-12)
    assert math.isclose(evals[0]["eval/bayes_auc/ctr"], auc(y, torch.from_numpy(got["p_true_ctr"])), rel_tol=1e-12)
    assert {"eval/mse/watch_time", "eval/bayes_mse/watch_time", "eval/auc/cvr"} <= evals[0].keys()

    records, summary = read_metrics(root / "run")
    steps = sums[0]["steps"]
    assert [r["step"] for r in records] == list(range(3, steps + 1, 3))
    for r in records:
        assert {"train/loss", "throughput/samples_per_s", "signals/rows_written", "train/auc/ctr"} <= r.keys()
        assert r["throughput/samples_per_s"] > 0 and 0 <= r["signals/rows_written"] <= 2 * 64 * r["step"]
    assert records[-1]["signals/rows_written"] >= 2 * 64 * 4  # at least the first window of both ranks
    assert summary["eval/auc/ctr"] == evals[0]["eval/auc/ctr"]
    assert (root / "run" / "config.yaml").is_file()


def test_eval_predictions_are_true_space_with_the_teachers_own_correction(tmp_path, monkeypatch):
    """One process: logit(pred) - raw teacher logit == log r - log q_eff[traffic] for every eval row."""
    from recdistill.train.distributed import destroy_distributed, init_distributed
    from recdistill.train.teacher import TeacherTrainer

    for var in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(var, "1" if var == "WORLD_SIZE" else "0")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = load_config(TINY_CONFIG, [*SETS, "data.samples_per_day=300", "teacher.steps=2",
                                                    f"signals.uri={tmp_path}/sig", f"tracking.run_dir={tmp_path}"])
    info = init_distributed()
    trainer = None
    try:
        trainer = TeacherTrainer(cfg, info)
        trainer.run()
        cols = trainer.evaluator.predict(trainer.dmp, trainer.eval_days)
        batch = trainer.source.read(trainer.eval_days[0], 0, 64)
        with torch.no_grad():
            raw = trainer.dmp(batch)
    finally:
        if trainer is not None:
            trainer.close()
            trainer.log.finish(True)
        destroy_distributed()
    rows = np.searchsorted(cols["sample_id"], batch.sample_id.numpy())
    np.testing.assert_array_equal(cols["sample_id"][rows], batch.sample_id.numpy())
    q = np.array([0.9, 0.6, 0.3])
    want = math.log(cfg.sampling.teacher.r) - np.log(q[batch.traffic.numpy()])
    pred = torch.from_numpy(cols["pred/ctr"][rows]).double()
    # float32 sigmoid then logit: ~1e-6 relative error in the probability, a few 1e-5 in the logit
    np.testing.assert_allclose(torch.logit(pred).numpy() - raw["ctr"].double().numpy(), want, atol=2e-4)
    assert len(set(batch.traffic.tolist())) > 1  # the per-traffic correction was really exercised
