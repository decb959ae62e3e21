"""The simple baselines (recdistill/baselines/) on real rows of small synthetic worlds: out-of-fold target encoding,
crosses chosen by cardinality, triple crosses where only a three-way effect exists, the prediction files scored by
experiment.score in the true space, the report rows, and `recdistill baselines`."""

import json

import numpy as np
import pytest
import torch

from recdistill.baselines import load_rows, preds_path, run_baselines
from recdistill.baselines.features import FeatureBuilder, bag_encode, cross_groups, folds_of, target_encode
from recdistill.baselines.models import fit_logistic
from recdistill.cli import main
from recdistill.config import ConfigError, load_config
from recdistill.data.roles import resolve_roles
from recdistill.data.source import build_source
from recdistill.distill.metrics import auc, paired_auc_se
from recdistill.experiment import comparison, gain_bases, load_preds, score, write_experiment_report

SMALL = ["data.num_days=3", "data.samples_per_day=3000", "data.history_len=32", "teacher.history_len=32",
         "data.world.num_users=300", "data.world.num_items=600", "tracking.progress=false"]


def _small(extra=()):
    cfg = load_config(None, [*SMALL, *extra])
    return cfg, build_source(cfg.data)


def test_out_of_fold_encoding_never_uses_a_rows_own_label():
    cfg, src = _small()
    train, evals = load_rows(cfg, src)
    y, folds = train.labels["ctr"], 5
    fold = folds_of(train.sample_id, folds)
    assert set(np.unique(fold)) == set(range(folds))
    n = len(y)
    # a key unique to each row: no other row shares it, so each row gets the prior, never its own label
    codes = np.arange(n)
    enc, enc_eval = target_encode(codes, y, fold, np.array([0, n - 1]), n, folds, prior_weight=20.0)
    np.testing.assert_allclose(enc, y.mean())
    np.testing.assert_allclose(enc_eval, (y[[0, n - 1]] + 20.0 * y.mean()) / 21.0)  # eval rows: every train row
    # one key for all rows: a row's encoding is the mean label of the other folds (its own fold left out)
    enc, enc_eval = target_encode(np.zeros(n, dtype=np.int64), y, fold, np.zeros(3, dtype=np.int64), 1, folds, 0.0)
    np.testing.assert_allclose(enc, np.array([y[fold != k].mean() for k in range(folds)])[fold])
    np.testing.assert_allclose(enc_eval, y.mean())
    # a key shared by a few rows: encoding from the others only, smoothed toward the prior
    codes = np.arange(n) // 4
    enc, _ = target_encode(codes, y, fold, codes[:1], n // 4 + 1, folds, prior_weight=2.0)
    i = 5
    others = (codes == codes[i]) & (fold != fold[i])
    expect = (y[others].sum() + 2.0 * y.mean()) / (others.sum() + 2.0)
    assert enc[i] == pytest.approx(expect)
    # several ids per row (a bag), none shared with another row: the prior; a row without ids: the prior too
    lengths = np.where(np.arange(n) % 3 == 0, 0, 2)
    enc, _ = bag_encode((lengths, np.arange(lengths.sum())), y, fold, (np.ones(1, np.int64), np.zeros(1, np.int64)),
                        folds, prior_weight=5.0)
    np.testing.assert_allclose(enc, y.mean())
    # the world's multi-valued item tags get such an encoding, and it varies
    assert "item_tags" in train.multi
    f = FeatureBuilder(train, evals, src.schema, resolve_roles(cfg.data.roles, src)).for_task("ctr")
    col = f.names.index("te_ctr_item_tags_mean")
    assert f.train[:, col].std() > 0 and f.eval[:, col].std() > 0


def test_crosses_are_chosen_by_cardinality_from_schema_and_roles():
    _, src = _small()
    roles = resolve_roles(load_config(None, SMALL).data.roles, src)
    multi = {"item_tags"}  # several ids per row: encoded by no group
    groups = cross_groups(src.schema, roles, multi, cross_limit=100)
    low = [k for k, c in src.schema.sparse.items() if c <= 100 and k not in multi]
    assert roles.user not in low and roles.item not in low and "item_cat" in low
    singles = [g for g in groups if len(g) == 1]
    assert sorted(k for (k,) in singles) == sorted(k for k in src.schema.sparse if k not in multi)
    n = len(low)
    assert sum(len(g) == 2 and not {roles.user, roles.item} & set(g) for g in groups) == n * (n - 1) // 2
    assert sum(len(g) == 3 for g in groups) == n * (n - 1) * (n - 2) // 6
    assert sorted(g for g in groups if roles.user in g) == sorted([(roles.user,), *((k, roles.user) for k in low)])
    assert not any("item_tags" in g for g in groups)
    # a lower limit crosses only the smaller vocabularies; order 2 has no triples
    small = cross_groups(src.schema, roles, multi, cross_limit=8, max_order=2)
    crossed = {k for g in small if len(g) > 1 for k in g} - {roles.user, roles.item}
    assert crossed and all(src.schema.sparse[k] <= 8 for k in crossed)
    assert not any(len(g) == 3 for g in small)


def test_triple_crosses_find_a_pure_three_way_interaction():
    """The world's cell effect with no one- or two-field part (heredity 0): pairwise encodings see none of it, the
    triple crosses do. Fails if the triples are missing, mis-keyed or not out of fold (overfit encodings)."""
    cfg, src = _small(["data.samples_per_day=6000", "data.history_len=16", "teacher.history_len=16",
                       "data.world.interaction_heredity=0", "data.world.interactions=3", "data.world.num_dense=2",
                       "data.tasks=[{name: ctr}]"])
    roles = resolve_roles(cfg.data.roles, src)
    train, evals = load_rows(cfg, src)
    y_eval = torch.from_numpy(evals.labels["ctr"])
    aucs = {}
    for order in (2, 3):
        f = FeatureBuilder(train, evals, src.schema, roles, max_order=order).for_task("ctr")
        aucs[order] = auc(y_eval, torch.from_numpy(fit_logistic(f.train, train.labels["ctr"]).logit(f.eval)))
    assert aucs[3] > aucs[2] + 0.05, aucs


def test_parallel_fits_give_the_same_predictions(monkeypatch):
    """The (task, baseline) fits run 2 at a time give the same predictions as one after another (each fit on one
    thread in both cases)."""
    from recdistill.baselines import fit_baselines

    cfg, src = _small()
    here = load_rows(cfg, src)
    roles = resolve_roles(cfg.data.roles, src)
    for mod in ("run", "models"):  # as on the 2-core box, on any machine: every fit on one thread either way
        monkeypatch.setattr(f"recdistill.baselines.{mod}.usable_cores", lambda: 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = fit_baselines(*here, cfg, src.schema, roles, ["lr", "gbdt"], workers=1)
        two = fit_baselines(*here, cfg, src.schema, roles, ["lr", "gbdt"], workers=2)
    finally:
        torch.set_num_threads(threads)
    for n in ("lr", "gbdt"):
        assert one[n].keys() == two[n].keys() and "pred_cvr" in one[n]
        for k in one[n]:
            np.testing.assert_array_equal(one[n][k], two[n][k], err_msg=f"{n} {k}")


def test_predictions_are_scored_in_the_true_space_and_reused_on_resume(tmp_path):
    cfg, src = _small()
    paths = run_baselines(cfg, src, tmp_path)
    assert set(paths) == {"baseline_lr", "baseline_gbdt"}
    kinds = {t.name: t.kind for t in src.schema.tasks}
    eval_day = src.days()[-1]
    ids = src.sample_ids(eval_day, np.arange(src.num_rows(eval_day)))  # every evaluation row, unsampled
    for name, p in paths.items():
        preds = load_preds(p)
        assert {"sample_id", "pred_ctr", "label_ctr", "p_true_ctr", "pred_cvr"} <= set(preds)
        assert "pred_watch_time" not in preds  # continuous tasks are not modelled
        r = score(preds, kinds, ids)
        assert 0.65 < r["auc/ctr"] < r["bayes_auc/ctr"] and 0.6 < r["auc/cvr"], (name, r)
        assert r["ne/ctr"] < 1.0, (name, r)
        # trained on the teacher's view (half the negatives), mapped back: the mean prediction is the true base
        # rate, not the sampled one (about twice it)
        y = preds["label_ctr"].mean()
        assert abs(preds["pred_ctr"].mean() - y) < 0.25 * y, (name, preds["pred_ctr"].mean(), y)
    before = {p: p.stat().st_mtime_ns for p in paths.values()}
    preds_path(tmp_path, "lr").unlink()
    run_baselines(cfg, src, tmp_path, resume=True)  # only the missing one is fit again
    assert paths["baseline_gbdt"].stat().st_mtime_ns == before[paths["baseline_gbdt"]]
    assert paths["baseline_lr"].exists()


def test_report_has_baseline_rows_and_the_teacher_gap(tmp_path):
    cfg, src = _small()
    kinds = {"ctr": "binary", "cvr": "binary", "watch_time": "continuous"}
    r = lambda a: {"auc/ctr": a, "ne/ctr": 0.9, "auc/cvr": a - 0.05, "ne/cvr": 0.9}  # noqa: E731
    auc_rows, gain_rows = comparison({"base": r(0.70), "distilled": r(0.72)}, r(0.74), {"distilled": "base"}, kinds,
                                     {"baseline_lr": r(0.76), "baseline_gbdt": r(0.75)})
    assert [x["model"] for x in auc_rows] == ["teacher", "base", "distilled", "baseline_lr", "baseline_gbdt"]
    assert {g["student"] for g in gain_rows} == {"distilled"}
    report = write_experiment_report(tmp_path, cfg, auc_rows, gain_rows, {}, {}, {}, kinds, eval_rows=10).read_text()
    assert "| baseline_lr |" in report and "| baseline_gbdt |" in report
    assert "ctr: teacher vs best baseline: -0.0200 AUC" in report and "cvr: teacher vs best baseline" in report


def test_gains_from_each_students_own_base_with_a_paired_interval():
    """Students can name their own base (a same-size base per student size); the paired bootstrap SE of a gain is
    positive, shrinks to 0 for identical predictions, and ignores the row order of the prediction files."""
    rng = np.random.default_rng(0)
    n = 2000
    y = (rng.random(n) < 0.3).astype(np.float32)
    ids = np.arange(n, dtype=np.int64)
    pred = lambda signal: 1 / (1 + np.exp(-(signal * (y - 0.3) + rng.normal(size=n))))  # noqa: E731
    preds = {"base_s": pred(0.5), "distilled_s": pred(1.0), "base_l": pred(1.0), "distilled_l": pred(2.0)}
    preds = {k: {"sample_id": ids, "label_ctr": y, "pred_ctr": v} for k, v in preds.items()}
    shuffled = rng.permutation(n)
    preds["distilled_l"] = {k: v[shuffled] for k, v in preds["distilled_l"].items()}
    results = {k: {"auc/ctr": auc(torch.from_numpy(v["label_ctr"]), torch.from_numpy(v["pred_ctr"])), "ne/ctr": 0.9}
               for k, v in preds.items()}
    teacher = {"auc/ctr": 0.95, "ne/ctr": 0.8}
    bases = {"distilled_s": "base_s", "distilled_l": "base_l", "base_s": "base_s", "base_l": "base_l"}
    _, rows = comparison(results, teacher, bases, {"ctr": "binary"}, preds=preds, bootstrap=100)
    by = {r["student"]: r for r in rows}
    assert set(by) == {"distilled_s", "distilled_l"} and by["distilled_l"]["base"] == "base_l"
    for name in by:
        b = by[name]["base"]
        assert by[name]["student_gain"] == pytest.approx(results[name]["auc/ctr"] - results[b]["auc/ctr"])
        assert 0 < by[name]["student_gain_se"] < 0.02
        aligned = np.argsort(preds[name]["sample_id"])  # the same SE as one paired bootstrap of the pair alone
        assert by[name]["student_gain_se"] == paired_auc_se(y, preds[name]["pred_ctr"][aligned],
                                                            preds[b]["pred_ctr"], 100)
    assert by["distilled_l"]["student_gain"] > 5 * by["distilled_l"]["student_gain_se"]
    preds["same"] = preds["base_s"]
    results["same"] = results["base_s"]
    _, rows = comparison(results, teacher, {"same": "base_s"}, {"ctr": "binary"}, preds=preds, bootstrap=100)
    assert rows[0]["student_gain"] == 0 and rows[0]["student_gain_se"] == 0


def test_students_named_as_a_base_get_no_gain_of_their_own():
    cfg = load_config(None, ["experiment.students=[{name: base}, {name: distilled}, {name: base_xs}, "
                             "{name: distilled_xs, base: base_xs}]"])
    assert gain_bases(cfg.experiment) == {"base": "base", "distilled": "base", "distilled_xs": "base_xs"}


def test_a_students_base_must_be_one_of_the_students():
    with pytest.raises(ConfigError, match=r"base \{'distilled': 'nope'\} is not one of the students"):
        load_config(None, ["experiment.students=[{name: base}, {name: distilled, base: nope}]"])


def test_cli_runs_the_baselines_alone(tmp_path, capsys):
    args = [a for s in SMALL for a in ("--set", s)]
    assert main(["baselines", *args, "--set", "experiment.baselines=[lr]", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| baseline_lr |" in out and "baseline_gbdt" not in out and "Bayes-optimal" in out
    saved = json.loads((tmp_path / "baselines.json").read_text())
    assert saved["results"]["baseline_lr"]["auc/ctr"] > 0.65 and (tmp_path / "config.yaml").is_file()
    assert main(["baselines", *args, "--set", "experiment.baselines=[]", "--out", str(tmp_path)]) == 2
    assert "experiment.baselines" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("experiment.baselines=[svm]", "experiment.baselines.0"),
    ("experiment.baselines=[lr, lr]", "each baseline at most once"),
    ("experiment.students=[{name: base}, {name: baseline_lr}]", "names starting with 'baseline_'"),
])
def test_bad_baseline_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
