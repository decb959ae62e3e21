"""Student checkpoint/resume on the synthetic world with real signal files: an interrupted and resumed student ends
bit-identical to an uninterrupted one; torn checkpoints are ignored; another config is refused."""

import json

import pytest
import torch
from helpers import write_oracle_signals

from recdistill.config import load_config
from recdistill.train import student_checkpoint as ckpt
from recdistill.train.student import StudentTrainer

# 2 training days + 1 eval day, ~40 student steps per epoch; beta=auto so the running averages must resume too.
SMALL = ["data.num_days=3", "data.samples_per_day=1600", "data.history_len=16", "data.batch_size=64",
         "data.prefetch=0", "data.world.num_users=200", "data.world.num_items=300", "student.history_len=8",
         "student.export=false", "tracking.progress=false", "student.lr=0.01", "student.beta=auto",
         "student.epochs=2", "student.checkpoint_every=5", "student.batch_size=32"]


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def signals(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("sig") / "store")
    write_oracle_signals(load_config(None, SMALL), uri)
    return uri


def trainer(signals, ckpt_dir, *extra):
    return StudentTrainer(load_config(None, [*SMALL, f"student.signals_uri={signals}",
                                             f"student.checkpoint_dir={ckpt_dir}", *extra]), run_dir=ckpt_dir.parent)


def params(t):
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def interrupt_at(monkeypatch, step):
    real = StudentTrainer.train_step

    def train_step(self, *a, **k):
        if self.steps == step:
            raise Interrupted
        return real(self, *a, **k)

    monkeypatch.setattr(StudentTrainer, "train_step", train_step)


def test_interrupted_student_resumes_bit_identical(tmp_path, signals, monkeypatch):
    ref = trainer(signals, tmp_path / "ref" / "ck")
    ref_summary = ref.train()
    per_epoch = ref_summary["train/steps"] // 2
    assert per_epoch > 12
    want = params(ref)

    # killed mid second epoch, 3 steps after a checkpoint: those 3 steps are redone after the resume
    stop = per_epoch + 8 - (per_epoch + 8) % 5 + 3
    interrupt_at(monkeypatch, stop)
    with pytest.raises(Interrupted):
        trainer(signals, tmp_path / "run" / "ck").train()
    monkeypatch.undo()
    assert ckpt.step_of(ckpt.newest(tmp_path / "run" / "ck")) == stop - 3
    assert len(ckpt.complete_checkpoints(tmp_path / "run" / "ck")) == 2  # checkpoint_keep

    resumed = trainer(signals, tmp_path / "run" / "ck")
    summary = resumed.train()
    assert summary["train/resumed_at_step"] == stop - 3
    got = params(resumed)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    for k in ("train/steps", "train/samples", "signals/looked_up", "signals/joined", "signals/missing"):
        assert summary[k] == ref_summary[k], k
    # resuming a finished run trains nothing more
    again = trainer(signals, tmp_path / "run" / "ck")
    assert again.train()["train/steps"] == ref_summary["train/steps"]
    assert all(torch.equal(v, want[k]) for k, v in params(again).items())


def test_torn_checkpoints_are_ignored_and_another_config_refused(tmp_path, signals, monkeypatch):
    root = tmp_path / "ck"
    interrupt_at(monkeypatch, 12)
    with pytest.raises(Interrupted):
        trainer(signals, root).train()
    monkeypatch.undo()
    good = ckpt.newest(root)
    assert ckpt.step_of(good) == 10
    # a crash mid-save leaves a tmp dir; a step dir without meta.json is incomplete; neither is loaded
    (root / ".tmp-deadbeef").mkdir()
    (root / ".tmp-deadbeef" / "model.pt").write_bytes(b"torn")
    torn = root / "step=000000011"
    torn.mkdir()
    (torn / "model.pt").write_bytes(b"torn")
    (torn / "state.json").write_text("{")
    assert ckpt.newest(root) == good
    digest = json.loads((good / "meta.json").read_text())["digest"]
    t = trainer(signals, root, "student.epochs=1")
    assert t.train()["train/resumed_at_step"] == 10
    assert t.digest == digest  # student.epochs is not part of it: a shorter or longer run continues
    assert not (root / ".tmp-deadbeef").exists() and not torn.exists()  # swept / replaced by a complete save
    with pytest.raises(RuntimeError, match="student digest"):
        trainer(signals, root, "student.hidden=32").train()
