"""Train the simple baselines on the teacher's rows and write their evaluation predictions.

    from recdistill.baselines import run_baselines
    paths = run_baselines(cfg, source, run_dir / "baselines")      # {"baseline_lr": .../baseline_lr.eval_preds.npz}
    recdistill baselines --config configs/demo.yaml --out runs/bl  # the same from the command line, AUC/NE printed

Training rows are the teacher's: its sampled view (sampling.teacher) of every day before the evaluation days, so a
baseline and the teacher learn from the same samples. Both baselines predict in that sampled space; their logits
are mapped to the true space with the teacher's SamplingConfig (debias.true_space), as the teacher's are. The
evaluation rows are the unsampled evaluation days every model is scored on. Only binary tasks are modelled (the
report compares AUC / NE); a continuous task gets no prediction and is left out of a baseline's rows.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from recdistill.baselines.features import FeatureBuilder, Rows, collect_rows
from recdistill.baselines.models import fit_gbdt, fit_logistic, gbdt_logit, valid_rows
from recdistill.config import Config
from recdistill.data.roles import resolve_roles
from recdistill.data.source import DataSource, phase_days
from recdistill.distill.debias import true_space, within_of
from recdistill.runtime import intra_op_threads, usable_cores
from recdistill.tracking import console

#: Baseline name (experiment.baselines) -> the model name in reports and summaries.
BASELINES = {"lr": "baseline_lr", "gbdt": "baseline_gbdt"}


def preds_path(out_dir: Path, name: str) -> Path:
    """Where baseline `name` ('lr' or 'gbdt') writes its evaluation predictions."""
    return Path(out_dir) / f"{BASELINES[name]}.eval_preds.npz"


def _fit_predict(name: str, x_train: np.ndarray, y: np.ndarray, x_eval: np.ndarray, sample_id: np.ndarray,
                 seed: int, threads: int | None = None) -> np.ndarray:
    """Sampled-space logits of the evaluation rows from baseline `name` fit on the training rows."""
    if name == "lr":
        return fit_logistic(x_train, y).logit(x_eval)
    if name == "gbdt":
        return gbdt_logit(fit_gbdt(x_train, y, valid_rows(sample_id, seed), seed=seed, threads=threads), x_eval)
    raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")


def fit_baselines(train: Rows, evals: Rows, cfg: Config, schema, roles, names: list[str], *,  # noqa: ANN001
                  max_order: int = 3, workers: int = 1) -> dict[str, dict[str, np.ndarray]]:
    """{baseline: {'sample_id', 'label_<task>', 'pred_<task>' (true-space probability), 'p_true_<task>'}} for the
    binary tasks, fit on `train` (rows of the teacher's view) and predicted on `evals`. `workers` > 1: that many
    (task, baseline) fits run at once, in threads, each on cores / workers threads (LightGBM and torch release
    the GIL while they compute); the fits and their results are the same as one after another."""
    kinds = {t.name: t.kind for t in schema.tasks}
    binary = [t for t, k in kinds.items() if k == "binary"]
    builder = FeatureBuilder(train, evals, schema, roles, cross_limit=cfg.experiment.baseline_cross_limit,
                             max_order=max_order, seed=cfg.experiment.seed)
    traffic = torch.from_numpy(evals.traffic)
    out = {n: {"sample_id": evals.sample_id} for n in names}
    logits: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    feats = {task: builder.for_task(task) for task in binary}
    jobs = sorted(((task, n) for task in binary for n in names), key=lambda j: j[1] != "gbdt")  # the long ones first
    workers = max(1, min(workers, len(jobs)))
    threads = max(1, usable_cores() // workers) if workers > 1 else None

    def fit(job: tuple[str, str]) -> tuple[str, str, np.ndarray, float]:
        task, n = job
        t0 = time.perf_counter()
        z = _fit_predict(n, feats[task].train, train.labels[task], feats[task].eval, train.sample_id,
                         cfg.experiment.seed, threads)
        return task, n, z, time.perf_counter() - t0

    # torch's threads are process-wide: each logistic regression gets its share of the cores
    with intra_op_threads(threads or torch.get_num_threads()), ThreadPoolExecutor(workers) as pool:
        for task, n, z, secs in pool.map(fit, jobs):
            logits[n][task] = torch.from_numpy(z)
            console(f"baselines: {BASELINES[n]} {task}: {feats[task].train.shape[1]} features, {secs:.1f} s")
    for task in binary:
        for n in names:
            out[n][f"label_{task}"] = evals.labels[task]
            if task in evals.p_true:
                out[n][f"p_true_{task}"] = evals.p_true[task]
    for n in names:  # all tasks at once: a task within the sampling task is mapped with the model's own click rate
        p = true_space(logits[n], {t: kinds[t] for t in binary}, cfg.sampling.teacher, traffic, schema.num_traffic,
                       within=within_of(schema.tasks))
        out[n].update({f"pred_{t}": v.numpy().astype(np.float32) for t, v in p.items()})
    return out


def load_rows(cfg: Config, source: DataSource, *, show_progress: bool | None = None) -> tuple[Rows, Rows]:
    """(training rows: the teacher's view of the days before the evaluation days, evaluation rows: unsampled)."""
    roles = resolve_roles(cfg.data.roles, source)
    # the teacher's days: with a streaming phase the batch phase trains before the streaming days and is scored
    # on the first of them
    train_days, eval_days, _ = phase_days(source.days(), cfg.data.eval_days, cfg.stream.days)
    history_len = min(cfg.teacher.history_len, cfg.data.history_len)  # the events the teacher sees
    show = cfg.tracking.progress if show_progress is None else show_progress
    train = collect_rows(source, train_days, cfg.sampling.teacher, roles, history_len, desc="baselines: train rows",
                         show_progress=show)
    evals = collect_rows(source, eval_days, None, roles, history_len, desc="baselines: eval rows",
                         show_progress=show)
    return train, evals


def run_baselines(cfg: Config, source: DataSource, out_dir: str | Path, names: list[str] | None = None, *,
                  resume: bool = False) -> dict[str, Path]:
    """Fit the baselines `names` (default: experiment.baselines) and write each one's evaluation predictions to
    `out_dir`/baseline_<name>.eval_preds.npz (the format teacher and students write). With `resume`, a baseline
    whose file exists is not fit again. The baselines are fit on every usable core. Returns {report model
    name: npz path}."""
    names = list(cfg.experiment.baselines if names is None else names)
    out_dir = Path(out_dir)
    paths = {BASELINES[n]: preds_path(out_dir, n) for n in names}
    todo = [n for n in names if not (resume and preds_path(out_dir, n).exists())]
    if len(todo) < len(names):
        console(f"baselines: reusing {', '.join(BASELINES[n] for n in names if n not in todo)} from {out_dir}")
    if not todo:
        return paths
    t0 = time.perf_counter()
    train, evals = load_rows(cfg, source)
    console(f"baselines: {len(train):,} training rows (view '{cfg.sampling.teacher.name}'), {len(evals):,} "
            f"evaluation rows, read in {time.perf_counter() - t0:.0f} s")
    roles = resolve_roles(cfg.data.roles, source)
    preds = fit_baselines(train, evals, cfg, source.schema, roles, todo, workers=usable_cores())
    out_dir.mkdir(parents=True, exist_ok=True)
    for n in todo:
        tmp = out_dir / f".{BASELINES[n]}.tmp.npz"
        np.savez(tmp, **preds[n])
        tmp.replace(preds_path(out_dir, n))  # whole or absent: a resumed run never reads half a file
    return paths
