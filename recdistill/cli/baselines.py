"""`recdistill baselines`: the simple baselines alone on a config, no teacher: AUC / NE on the evaluation days.

    recdistill baselines --config configs/demo.yaml --out runs/baselines          # both, the table printed
    recdistill baselines --config configs/demo.yaml --set experiment.baselines=[lr] --out DIR --json

Training rows are the teacher's view (sampling.teacher) of the days before the evaluation days, evaluation rows the
unsampled evaluation days, as in `recdistill demo` (recdistill/baselines/). DIR gets each baseline's
baseline_<name>.eval_preds.npz (the format teacher and students write), the resolved config.yaml and
baselines.json (the scores); an existing prediction file in DIR is reused with --resume.
"""

from __future__ import annotations

import json
from pathlib import Path

from recdistill.config import add_config_arguments, config_from_args, save_config
from recdistill.errors import UsageError


def run(args) -> int:  # noqa: ANN001 - argparse.Namespace
    """Fit the configured baselines, score them on the evaluation rows and print the AUC / NE table."""
    from recdistill.baselines import run_baselines
    from recdistill.experiment import load_preds, model_rows, score
    from recdistill.preflight import open_source, with_source_tasks
    from recdistill.report import markdown_table
    from recdistill.tracking import console

    cfg = config_from_args(args)
    if not cfg.experiment.baselines:
        raise UsageError("experiment.baselines is empty: nothing to run",
                         fix="set experiment.baselines=[lr,gbdt] (or one of them)")
    source = open_source(cfg)
    cfg = with_source_tasks(cfg, source)
    out = Path(args.out)
    save_config(cfg, out)
    paths = run_baselines(cfg, source, out, resume=args.resume)
    kinds = {t.name: t.kind for t in source.schema.tasks}
    preds = {name: load_preds(p) for name, p in paths.items()}
    ids = next(iter(preds.values()))["sample_id"]
    results = {name: score(p, kinds, ids) for name, p in preds.items()}
    (out / "baselines.json").write_text(json.dumps({"eval_rows": int(len(ids)), "results": results}, indent=1))
    if args.json:
        print(json.dumps({"eval_rows": int(len(ids)), "results": results}))
    else:
        console("\n" + markdown_table(model_rows(results, kinds)) + "\n")
        console(f"baselines: {len(ids):,} evaluation rows; predictions and baselines.json in {out}")
    return 0


def register(sub) -> None:  # noqa: ANN001 - argparse subparsers
    """Add `recdistill baselines`."""
    p = sub.add_parser("baselines", help="the simple baselines (logistic regression, LightGBM) alone on a config: "
                       "AUC / NE on the evaluation days, no teacher")
    add_config_arguments(p)
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the predictions and scores")
    p.add_argument("--resume", action="store_true", help="reuse prediction files already in DIR")
    p.add_argument("--json", action="store_true", help="print the scores as one JSON object instead of the table")
    p.set_defaults(func=run)
