"""Student trainer on the synthetic world with a real signal store written by an oracle teacher (p_true mapped
into the teacher's sampled space): joins, risk isolation under broken windows, the quality gate, export."""

import numpy as np
import pytest
import torch
from helpers import write_oracle_signals

from recdistill.config import load_config
from recdistill.data.loader import BatchLoader
from recdistill.data.source import build_source
from recdistill.distill import metrics
from recdistill.train.student import StudentTrainer, batch_signal_auc, rows_done_at, run_student

# 3 training days + 1 eval day; small tables so that a few thousand samples teach something.
SMALL = ["data.num_days=4", "data.samples_per_day=12000", "data.history_len=32", "data.batch_size=64",
         "data.prefetch=0", "data.world.num_users=400", "data.world.num_items=800", "student.history_len=16",
         "student.export=false", "tracking.progress=false", "student.lr=0.01"]
BASE = ["student.towers=single", "student.tower_loss=task"]
# Tolerance of risk isolation: a broken teacher may cost the served tower at most this much AUC against the
# no-distillation student trained on the same data with the same seed (eval AUC noise at 12,000 rows is ~0.005;
# the base student reaches ~0.64 here, the Bayes ceiling ~0.83).
TOL = 0.015


@pytest.fixture(scope="module")
def world_cfg():
    return load_config(None, SMALL)


@pytest.fixture(scope="module")
def base_auc(world_cfg, tmp_path_factory):
    run = tmp_path_factory.mktemp("base")
    return run_student(load_config(None, SMALL + BASE), run, name="base")["eval/auc/ctr"]


def distilled(tmp_path, corrupt=None, extra=(), window_steps=4):
    uri = str(tmp_path / "sig")
    info = write_oracle_signals(load_config(None, SMALL), uri, corrupt=corrupt, window_steps=window_steps)
    cfg = load_config(None, SMALL + [f"student.signals_uri={uri}", *extra])
    return run_student(cfg, tmp_path / "run", name="distilled"), info


def test_progress_counts_source_rows_up_to_a_true_total():
    cfg = load_config(None, [*SMALL, "data.samples_per_day=1000", "data.batch_size=50"])
    src = build_source(cfg.data)
    loader = BatchLoader(src, [0, 1], 50, view=cfg.sampling.student, chunk_rows=300, prefetch=0)
    done_before = rows_done_at(loader)
    assert done_before(None) == src.num_rows(0) + src.num_rows(1)  # every source row of the pass, known up front
    seen = [done_before(p.end) for p in loader.stream()]
    # moves forward and lags by at most the work item being read (the trainer completes the bar after each pass)
    assert seen == sorted(seen) and seen[0] < seen[-1] and done_before(None) - seen[-1] <= 300


def test_batch_signal_auc_matches_metrics_auc():
    g = torch.Generator().manual_seed(0)
    s, y = torch.randn(300, generator=g), (torch.rand(300, generator=g) < 0.3).float()
    mask = torch.rand(300, generator=g) < 0.8
    assert batch_signal_auc(s, y, mask) == pytest.approx(metrics.auc(y[mask], s[mask]), abs=1e-6)  # torchmetrics: fp32
    # the standard error of a random score's AUC: sqrt((P + N + 1) / (12 P N)) under no signal (Mann-Whitney)
    a, se = batch_signal_auc(s, y, mask, with_se=True)
    p, n = int(y[mask].sum()), int((1 - y[mask]).sum())
    assert se == pytest.approx(((p + n + 1) / (12 * p * n)) ** 0.5, rel=0.1)
    assert np.isnan(batch_signal_auc(s, y, torch.zeros(300, dtype=torch.bool)))  # too few labels to judge


def test_every_student_sample_joins_a_signal_and_distillation_helps(tmp_path, base_auc):
    summary, info = distilled(tmp_path)
    assert summary["signals/looked_up"] == summary["train/samples"] > 1000
    # the student's view nests in the teacher's: every sample finds its signal
    assert summary["signals/joined"] == summary["signals/looked_up"] and summary["signals/missing"] == 0
    assert summary["signals/rejected_batches"] == 0
    assert summary["eval/auc/ctr"] >= base_auc - TOL
    assert summary["eval/aux/auc/ctr"] > base_auc  # the distilled tower itself learns from a perfect teacher


@pytest.mark.parametrize("kind", ["garbage", "nan", "missing", "truncated"])
def test_a_broken_window_is_counted_and_the_served_tower_survives(tmp_path, base_auc, kind):
    # Three teacher windows of 8 steps (3 x 8 x 64 teacher samples, ~460 of them in the student's view, ~7
    # student batches). The gate judges whole student batches, so the batches at the edges of the broken span,
    # half good and half garbage, may pass it; the decoupled towers keep those away from the served tower.
    skip = ["signals.on_corrupt=skip"] if kind == "truncated" else []  # the default refuses a corrupt store
    summary, info = distilled(tmp_path, corrupt={1: kind, 2: kind, 3: kind}, window_steps=8, extra=skip)
    assert summary["train/steps"] > 10  # training went on through the broken windows
    counts = {k: summary[f"signals/{k}"] for k in ("missing", "rejected_non_finite", "rejected_batches")}
    if kind == "garbage":
        assert counts["rejected_batches"] >= 3 and counts["missing"] == counts["rejected_non_finite"] == 0
    elif kind == "nan":
        assert counts["rejected_non_finite"] > 100 and counts["missing"] == 0
    else:
        assert counts["missing"] > 100 and counts["rejected_non_finite"] == 0
    if kind == "truncated":  # the skipped shards are reported, not only seen as missing rows
        broken = sum(w < info["windows"] for w in (1, 2, 3))  # windows that were written, then cut
        assert broken >= 2 and summary["signals/corrupt_shards"] == broken
        assert counts["missing"] <= summary["signals/corrupt_rows"]
    else:
        assert summary["signals/corrupt_shards"] == summary["signals/corrupt_rows"] == 0
    assert summary["signals/joined"] < summary["signals/looked_up"]
    assert summary["eval/auc/ctr"] >= base_auc - TOL, f"{kind} signals pulled the served tower down"


def test_gate_rejects_an_all_garbage_teacher(tmp_path, base_auc):
    summary, info = distilled(tmp_path, corrupt={w: "garbage" for w in range(100)})
    steps = summary["train/steps"]
    # random logits pass the gate (AUC two standard errors above 0.5) on ~2% of batches by chance
    assert summary["signals/rejected_batches"] >= 0.9 * steps
    assert summary["eval/auc/ctr"] >= base_auc - TOL


def test_missing_store_is_a_clear_error(tmp_path):
    cfg = load_config(None, SMALL + [f"student.signals_uri={tmp_path / 'nothing'}"])
    with pytest.raises(FileNotFoundError, match="nothing.*no committed signal shard"):
        StudentTrainer(cfg, run_dir=tmp_path)


def test_export_serves_the_main_tower_in_the_true_space(tmp_path):
    cfg = load_config(None, SMALL + BASE[:0] + ["student.export=true", "data.samples_per_day=1500"]
                      + [f"student.signals_uri={tmp_path / 'sig'}"])
    write_oracle_signals(cfg, str(tmp_path / "sig"))
    summary = run_student(cfg, tmp_path / "run", name="s")
    assert summary["export/format"] == "torch.export" and summary["export/max_abs_diff"] <= 1e-5
    program = torch.export.load(summary["export/path"])
    names = list(program.state_dict)
    assert names and not any(".aux." in n for n in names), "the auxiliary tower must not be served"
    # the exported program on a batch of a third size equals the trainer's own true-space main-tower predictions
    trainer = StudentTrainer(cfg, run_dir=tmp_path / "again")
    trainer.model.load_state_dict({k[len("model."):]: v for k, v in program.state_dict.items()
                                   if k.startswith("model.")}, strict=False)
    batch = build_source(cfg.data).read(3, 0, 77)
    from recdistill.models.student import serving_inputs

    got = program.module()(*serving_inputs(trainer.model, batch))
    want = torch.stack(list(trainer._true_space(trainer.model(batch).main, batch).values()), 1)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    assert ((got[:, 0] > 0) & (got[:, 0] < 1)).all()


def test_students_evaluated_in_one_pass_score_as_each_alone(tmp_path):
    """evaluate_students shares one pass over the data among students that read the same data (the streaming phase
    scores every student every day); each result must be what the student's own evaluate gives."""
    from recdistill.train.student import evaluate_students

    small = [*SMALL, "data.samples_per_day=1500", "student.tower_loss=task"]
    trainers = [StudentTrainer(load_config(None, [*small, *extra]), run_dir=tmp_path / str(i), open_store=False)
                for i, extra in enumerate([["student.towers=single"], ["student.towers=decoupled"],
                                           ["student.towers=single", "student.batch_size=50"]])]
    for t in trainers[:2]:  # make the first two differ from their initial weights and from each other
        for batch in t.loader(t.train_days[-1:], t.view):
            t.train_step(batch)
    together = evaluate_students(trainers, [3])
    for t, (res, preds) in zip(trainers, together, strict=True):
        alone, alone_preds = t.evaluate([3])
        assert res == alone
        assert preds.keys() == alone_preds.keys()
        for k, v in preds.items():
            np.testing.assert_array_equal(v, alone_preds[k], err_msg=k)
    assert together[0][0]["auc/ctr"] != together[1][0]["auc/ctr"]  # different students, different scores
    assert not np.array_equal(together[0][1]["pred_ctr"], together[2][1]["pred_ctr"])  # trained vs untrained


def test_dense_bins_are_fitted_to_the_students_own_training_rows(tmp_path):
    """student.dense=bins: the bins' edges are the quantiles of the first FIT_ROWS rows of the
    student's view of its training days, set before training; 'linear' has no bins."""
    from recdistill.models.dense import FIT_ROWS, normal_edges, quantile_edges

    cfg = load_config(None, SMALL + BASE + ["student.dense=bins"])
    trainer = StudentTrainer(cfg, run_dir=tmp_path)
    rows = torch.cat([b.dense for b in trainer.loader(trainer.train_days, trainer.view)])[:FIT_ROWS]
    edges = trainer.model.dense_emb.edges
    torch.testing.assert_close(edges, quantile_edges(rows, cfg.student.dense_bins))
    assert not torch.allclose(edges, normal_edges(*edges.shape[:1], cfg.student.dense_bins))
    lin = StudentTrainer(load_config(None, SMALL + BASE), run_dir=tmp_path / "lin")  # the default
    assert lin.model.dense_emb is None and lin.model.dense_proj is not None


def write_oracle_hidden(cfg, uri: str, dim: int = 6) -> int:
    """A representation store beside the logits store at `uri` (hidden_uri), through the real SignalWriter: for every
    sample of the teacher's view, a fixed random mix of its true click and conversion logits and its first dense
    features, as a teacher's last layer would hold them. Returns the rows written."""
    from recdistill.signals.schema import SignalMeta, hidden_names, hidden_uri
    from recdistill.signals.writer import SignalWriter

    src = build_source(cfg.data)
    meta = SignalMeta(run_id="oracle", teacher_version="oracle", tasks=hidden_names(dim), sampling=cfg.sampling.teacher)
    mix = torch.randn(5, dim, generator=torch.Generator().manual_seed(3))
    rows = 0
    with SignalWriter(hidden_uri(uri), 0, meta, window_steps=4) as w:
        for step, b in enumerate(BatchLoader(src, src.days()[: -cfg.data.eval_days], cfg.data.batch_size,
                                             view=cfg.sampling.teacher, prefetch=0)):
            p = torch.stack([b.p_true["ctr"], b.p_true["cvr"]], 1).double().clamp(1e-6, 1 - 1e-6)
            feats = torch.cat([(p.log() - (-p).log1p()).float(), b.dense[:, :3]], 1)
            w.write(b.sample_id, feats @ mix, step)
            rows += len(b)
    return rows


def test_the_representation_hint_is_joined_and_learnt(tmp_path):
    """student.hint_weight: every distilled sample with a logit gets the teacher's representation, and the hint head
    learns to predict it: the unexplained share of its variance starts above 1 (an untrained head is worse than the
    batch mean) and ends well below it (the true logits in the mix are partly beyond any student's inputs)."""
    uri = str(tmp_path / "sig")
    cfg0 = load_config(None, SMALL)
    write_oracle_signals(cfg0, uri)
    assert write_oracle_hidden(cfg0, uri) > 1000
    cfg = load_config(None, SMALL + [f"student.signals_uri={uri}", "student.hint_weight=1"])
    trainer = StudentTrainer(cfg, run_dir=tmp_path / "run")
    assert trainer.model.hint.out_features == 6
    hint = []
    for positioned in trainer.loader(trainer.train_days, trainer.view).stream(workers=0, prefetch=0):
        hint.append(float(trainer.train_step(positioned.batch)["loss/hint"]))
    c = trainer.counts
    assert c.looked_up > 1000 and c.hint_joined == c.joined == c.looked_up  # nested views: every sample has both
    assert np.mean(hint[:3]) > 1.5 and np.mean(hint[-20:]) < 0.8, (hint[:3], hint[-20:])
    # the base student (labels only) ignores the weight and needs no store
    base = StudentTrainer(load_config(None, SMALL + BASE + ["student.hint_weight=1"]), run_dir=tmp_path / "b")
    assert base.hidden_reader is None and base.model.hint is None


def test_a_hint_without_a_representation_store_is_a_clear_error(tmp_path):
    uri = str(tmp_path / "sig")
    write_oracle_signals(load_config(None, SMALL), uri)
    cfg = load_config(None, SMALL + [f"student.signals_uri={uri}", "student.hint_weight=1"])
    with pytest.raises(FileNotFoundError, match=r"sig\.hidden has no committed shard.*teacher\.signal_hidden"):
        StudentTrainer(cfg, run_dir=tmp_path / "run")


def test_a_streaming_student_keeps_the_batch_phase_hint_head(tmp_path):
    """The streaming phase (no store: the stream carries logits only) builds the head of teacher.signal_hidden's
    width, so the batch phase's checkpoint loads into it; a labels-only student has none."""
    cfg = load_config(None, SMALL + ["student.hint_weight=2", "teacher.signal_hidden=7"])
    t = StudentTrainer(cfg, run_dir=tmp_path / "s", open_store=False)
    assert t.hidden_reader is None and t.model.hint.out_features == 7

