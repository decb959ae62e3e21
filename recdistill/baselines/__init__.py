"""Strong simple baselines beside teacher and students: logistic regression and LightGBM on engineered features.

    from recdistill.baselines import run_baselines
    run_baselines(cfg, source, run_dir / "baselines")     # baseline_lr / baseline_gbdt .eval_preds.npz

features.py builds the features (history match, out-of-fold target encodings of sparse features and their crosses,
log frequencies, dense, traffic), models.py fits the two learners, run.py wires data, features, models and files.
"""

from recdistill.baselines.run import BASELINES, fit_baselines, load_rows, preds_path, run_baselines

__all__ = ["BASELINES", "fit_baselines", "load_rows", "preds_path", "run_baselines"]
