"""The teacher trainer under torchrun (2 gloo ranks, DMP + DeepSpeed) trains every sample of the teacher's view of
the training days once and writes exactly one committed raw-logit row for each, and for nothing else.

The config makes the ranks' data uneven (1200 rows a day in chunks of 256: rank 0 gets 3 chunks, rank 1 two, the
last one short; after sampling 12 and 10 batches of 64, with a partial last batch every day on both ranks), so the
padded partial batches and a finished rank's filler batches are exercised: their rows must never be written. The
torchrun runs are conftest.py's (torchrun_teacher), the table-wise one shared with test_teacher_eval.py.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recdistill.config import load_config
from recdistill.data.loader import BatchLoader
from recdistill.data.sampling import keep_mask
from recdistill.data.source import build_source
from recdistill.signals.reader import SignalReader
from recdistill.signals.schema import COMMITS, hidden_uri
from recdistill.tracking import read_metrics

TINY_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "teacher" / "tiny.yaml")  # from any cwd


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("sharding,zero", [("row_wise", 3), ("table_wise", 2)])
def test_torchrun_teacher_writes_one_row_per_trained_sample(torchrun_teacher, sharding, zero):
    root, sets = torchrun_teacher(sharding, zero)
    cfg = load_config(TINY_CONFIG, sets)
    batches = [[len(b) for b in BatchLoader(build_source(cfg.data), [0, 1], 64, view=cfg.sampling.teacher, rank=r,
                                            world_size=2, prefetch=0)] for r in range(2)]
    # the case this test is about: unequal batch counts and partial last batches (else it could not fail)
    assert len(batches[0]) != len(batches[1]) and all(min(b) < 64 for b in batches), batches
    sums = [json.loads((root / f"sum.rank{r}.json").read_text()) for r in range(2)]
    assert sums[0]["steps"] == sums[1]["steps"] == max(map(len, batches))  # ranks step while any has data
    assert [s["batches"] for s in sums] == [len(b) for b in batches]
    reader = SignalReader(str(root / "sig"), tasks=["ctr", "cvr", "watch_time"])
    assert reader.stats.duplicates == 0 and reader.stats.non_finite_rows == 0
    assert reader.meta.sampling == cfg.sampling.teacher and reader.meta.teacher_version == cfg.teacher_digest()
    # the committed ids are exactly the teacher's view of the training days (day 2 is the eval day: never written),
    # recomputed from the deterministic world and the keep mask, not from the loader
    from recdistill.data.world import SyntheticWorld

    world = SyntheticWorld(cfg.data)
    view = []
    for d in (0, 1):
        b = world.read(d, 0, 1200)
        keep = keep_mask(b.sample_id.numpy(), b.labels["ctr"].numpy() > 0.5, b.traffic.numpy(), cfg.sampling.teacher, 3)
        view.append(b.sample_id.numpy()[keep])
    view = np.sort(np.concatenate(view))
    np.testing.assert_array_equal(np.sort(reader.sample_ids), view)
    assert reader.stats.rows == sum(s["trained_samples"] for s in sums) == len(view) == sum(map(sum, batches))
    commits = list((root / "sig" / COMMITS).glob("*.json"))
    assert len(commits) == 2 * len(reader.windows)  # both ranks committed every window
    logits, found = reader.lookup(torch.from_numpy(view[:5]))
    assert found.all() and logits.shape == (5, 3)
    # teacher.signal_hidden=8: the representations beside them, one row for each sample with a logit, same windows
    hidden = SignalReader(hidden_uri(str(root / "sig")), teacher_version=cfg.teacher_digest())
    assert hidden.meta.tasks == [f"h{i}" for i in range(8)] and hidden.meta.sampling == cfg.sampling.teacher
    assert hidden.stats.duplicates == 0 and hidden.stats.non_finite_rows == 0 and hidden.windows == reader.windows
    np.testing.assert_array_equal(np.sort(hidden.sample_ids), view)
    h, found = hidden.lookup(torch.from_numpy(view))
    assert found.all() and h.shape == (len(view), 8) and h.std(0).min() > 0  # every column varies over samples


def test_hidden_tap_catches_the_input_of_the_task_heads():
    """HiddenTap (teacher.signal_hidden) holds what the heads read: at d_model columns, the heads applied to it
    give the forward's logits exactly; narrower, a fixed projection of it, the same for the same seed."""
    from helpers import SCHEMA, make_batch

    from recdistill.config import TeacherConfig
    from recdistill.models.teacher import TeacherModel
    from recdistill.train.teacher import HiddenTap

    torch.manual_seed(0)
    model = TeacherModel(SCHEMA, TeacherConfig(history_len=20, merge_k=3, recent_k=4, d_model=16, num_tokens=4,
                                               longer_dim=8, emb_dim=4, embedding_backend="torch"))
    full, narrow = HiddenTap(model.dense, 16, seed=1), HiddenTap(model.dense, 5, seed=1)
    out = model(make_batch())
    h = full.take()
    assert h.shape == (9, 16) and full.proj is None
    for t, head in model.dense.heads.items():
        torch.testing.assert_close(head(h).squeeze(-1), out[t])
    torch.testing.assert_close(narrow.take(), h @ HiddenTap(model.dense, 5, seed=1).proj)
    assert not torch.equal(narrow.proj, HiddenTap(model.dense, 5, seed=2).proj)
    full.handle.remove()
    narrow.handle.remove()


@pytest.mark.parametrize("extra", [[], ["teacher.dense=bins", "data.counts=true"]])
def test_single_process_teacher_through_the_cli(tmp_path, monkeypatch, extra):
    from recdistill.cli import main

    for var in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)  # a lone process: no rendezvous
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(var, "1" if var == "WORLD_SIZE" else "0")  # restored after the test
    code = main(["teacher", "--config", TINY_CONFIG, "--set", "data.samples_per_day=400",
                 "--set", "data.num_days=2", "--set", "data.batch_size=50", "--set", f"signals.uri={tmp_path}/s",
                 "--set", "tracking.mode=disabled", "--set", f"tracking.run_dir={tmp_path}/runs",
                 *[a for o in extra for a in ("--set", o)]])
    assert code == 0
    reader = SignalReader(str(tmp_path / "s"))
    cfg = load_config(TINY_CONFIG, ["data.samples_per_day=400", "data.num_days=2"])
    view = [b.sample_id for b in BatchLoader(build_source(cfg.data), [0], 50, view=cfg.sampling.teacher, prefetch=0)]
    assert len(torch.cat(view)) % 50  # a partial last batch: padded, trained, written once
    assert reader.stats.duplicates == 0
    np.testing.assert_array_equal(np.sort(reader.sample_ids), np.sort(torch.cat(view).numpy()))
    # the summary counts the rows of the last window too (it was read before the writer's final commit)
    (run_dir,) = (tmp_path / "runs").iterdir()
    _, summary = read_metrics(run_dir)
    assert summary["signals/rows_written"] == len(reader.sample_ids)


def test_resume_refuses_a_representation_store_without_the_checkpoints_windows(tmp_path, monkeypatch):
    """teacher.signal_hidden: a checkpoint vouches for the windows of every store it was written with, the
    representations' too; a resume whose representation store lost them refuses, naming that store."""
    import shutil

    from recdistill.cli import main

    for var in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(var, "1" if var == "WORLD_SIZE" else "0")
    argv = ["teacher", "--config", TINY_CONFIG, *[a for o in (
        "data.samples_per_day=400", "data.num_days=2", "data.batch_size=50", f"signals.uri={tmp_path}/s",
        "signals.window_steps=2", "teacher.signal_hidden=4", f"teacher.checkpoint_dir={tmp_path}/ckpt",
        "tracking.mode=disabled", f"tracking.run_dir={tmp_path}/runs") for a in ("--set", o)]]
    assert main(argv) == 0
    logits, hidden = SignalReader(str(tmp_path / "s")), SignalReader(hidden_uri(str(tmp_path / "s")))
    assert hidden.windows == logits.windows and len(logits.windows) > 1
    assert main(argv) == 0  # finished: resumed as finished, both stores intact
    shutil.rmtree(hidden_uri(str(tmp_path / "s")))
    with pytest.raises(RuntimeError, match=r"windows \[0, 1.* are not committed in .*/s\.hidden"):
        main(argv)


def test_dense_bins_are_fitted_to_rows_of_every_training_day(monkeypatch):
    """The teacher's dense bins (teacher.dense=bins) are fitted to rows spread over the training days: the counting
    features are all 0 on the first day, so its rows alone would give them no bins. Read in pieces (a short last one
    here), the same rows."""
    import recdistill.train.teacher as teacher
    from recdistill.train.teacher import dense_fit_rows

    monkeypatch.setattr(teacher, "FIT_READ_ROWS", 64)

    cfg = load_config(TINY_CONFIG, ["data.samples_per_day=400", "data.num_days=3", "data.counts=true",
                                   "data.count_scale=log"])
    src = build_source(cfg.data)
    rows = dense_fit_rows(src, [0, 1], rows=300)
    assert rows.shape == (300, len(src.schema.dense))
    torch.testing.assert_close(rows[:150], src.read(0, 0, 150).dense)
    torch.testing.assert_close(rows[150:], src.read(1, 0, 150).dense)
    counts = rows[:, len(src.inner.schema.dense):]
    assert not counts[:150].any() and counts[150:].any()
