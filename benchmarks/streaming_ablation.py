"""The paper's streaming ablation (Table 8 / Fig. 5, issue 17) over several seeds: one table of next-day AUC gains
per streaming day and a plot.

    python benchmarks/streaming_ablation.py                        # seeds 0,1 (about 16 min each on the 2-core box)
    python benchmarks/streaming_ablation.py --seeds 0,1,2          # more seeds; finished seeds are reused
    python benchmarks/streaming_ablation.py --quick --seeds 0      # tiny sizes: a smoke test (~3 min)

Each seed runs `recdistill experiment --streaming --config configs/demo.yaml --config
configs/experiments/streaming.yaml --set experiment.seed=S` in a subprocess, into <run-dir>/seed<S> (its console
output in <run-dir>/seed<S>.log); a seed whose streaming phase finished (stream/stream_summary.json) is reused. The
seed moves model initialisation and shuffling of the teacher and of every student; the world (data.seed) stays, so
the rows are the same and only training noise differs between seeds.

Per streaming day d (scored on day d + 1, unsampled) and student variant v of the experiment config: gain_v(d) =
AUC_v - AUC_base on CTR, its mean over seeds, the standard error of that mean (sd / sqrt(seeds); none with one
seed) and its share of the teacher's gain over the base that day; a first row does the same for the batch phase
(its students before any streaming, scored on the first streaming day). The variants
(configs/experiments/streaming.yaml): a = batch-distilled, streaming with distillation; b = batch-distilled,
streaming on labels; c = batch-distilled, frozen; d = distilled in the streaming phase only. The paper's direction:
a > b > c and a > d. Result: results/streaming_ablation-<cpu>[-quick].json (device, versions, commands, per-seed
rows, the aggregate, join metrics, wall time) and a PNG beside it; the last stdout line is the aggregate as one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import cpu_name, write_result  # benchmarks/ is sys.path[0] when run as a script

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "configs" / "demo.yaml", ROOT / "configs" / "experiments" / "streaming.yaml"]
COMMON = ["tracking.progress=false"]
#: --quick: the same experiment at a size that runs in minutes (a smoke test of the script, not a result).
QUICK = ["teacher.preset=tiny", "data.samples_per_day=4000", "data.history_len=64", "teacher.history_len=64",
         "student.history_len=16", "student.history_summary=64", "data.batch_size=128", "student.batch_size=128",
         "data.world.num_users=400", "data.world.num_items=800", "stream.days=2", "data.num_days=6"]


def run_seed(seed: int, root: Path, quick: bool, task: str) -> dict:
    """One seed's experiment (reused when its streaming phase finished); returns its stream_summary.json."""
    run_dir = root / f"seed{seed}"
    summary = run_dir / "stream" / "stream_summary.json"
    cmd = [sys.executable, "-m", "recdistill.cli", "experiment", "--streaming",
           *[a for c in CONFIGS for a in ("--config", str(c))],
           *[a for o in [*COMMON, f"tracking.run_dir={root}", f"tracking.run_name=seed{seed}",
                         f"experiment.seed={seed}", *(QUICK if quick else [])] for a in ("--set", o)]]
    if not summary.exists():
        if run_dir.exists():
            raise SystemExit(f"{run_dir} holds an unfinished run: delete it to run seed {seed} again")
        t0 = time.perf_counter()
        print(f"seed {seed}: running ({root / f'seed{seed}.log'})", flush=True)
        with open(root / f"seed{seed}.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        if rc != 0 or not summary.exists():
            raise SystemExit(f"seed {seed} failed (exit {rc}); see {root / f'seed{seed}.log'}")
        print(f"seed {seed}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    out = json.loads(summary.read_text())
    out["command"] = " ".join(str(c) for c in cmd[1:])
    out["batch"] = _batch_aucs(run_dir, task)
    return out


def _batch_aucs(run_dir: Path, task: str) -> dict[str, float]:
    """The batch phase's next-day AUC per model (the run's summary line in metrics.jsonl)."""
    from recdistill.tracking import read_metrics

    _, summary = read_metrics(run_dir)
    return {k: v for k, v in summary.items() if k.endswith(f"auc/{task}")}


def aggregate(runs: dict[int, dict], base: str, task: str) -> dict:
    """Per day and model: mean AUC; per day and variant: mean gain over `base`, its standard error over seeds, and
    the share of the teacher's gain over `base` it holds (gain / teacher gain, of the means). The first row is the
    batch phase (day None: its students before any streaming, scored on the first streaming day)."""
    first = next(iter(runs.values()))
    models = sorted({k.split("/")[0] for r in runs.values() for row in r["days"] for k in row
                     if k.endswith(f"auc/{task}")})
    variants = [m for m in models if m not in (base, "teacher")]
    batch = [{f"{m}/auc/{task}": r["batch"][f"{m}/auc/{task}"] for m in models} for r in runs.values()]
    per_day = [("batch", None, first["days"][0]["day"], batch)] + [
        ("stream", row["day"], row["eval_day"], [r["days"][i] for r in runs.values()])
        for i, row in enumerate(first["days"])]
    table = []
    for phase, day, eval_day, rows in per_day:
        out = {"phase": phase, "day": day, "eval_day": eval_day}
        auc = {m: np.array([row[f"{m}/auc/{task}"] for row in rows]) for m in models}
        for m in models:
            out[f"{m}/auc"] = float(auc[m].mean())
        teacher_gain = float((auc["teacher"] - auc[base]).mean())
        for v in variants:
            gains = auc[v] - auc[base]
            out[f"{v}/gain"] = float(gains.mean())
            out[f"{v}/gain_se"] = float(gains.std(ddof=1) / np.sqrt(len(gains))) if len(gains) > 1 else None
            out[f"{v}/share_of_teacher_gain"] = float(gains.mean() / teacher_gain) if teacher_gain > 0 else None
        table.append(out)
    stream = [row for row in table if row["phase"] == "stream"]
    return {"days": table, "variants": variants,
            "mean_gain": {v: float(np.mean([row[f"{v}/gain"] for row in stream])) for v in variants}}


def plot(agg: dict, base: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    rows = agg["days"]
    x = np.arange(len(rows))
    labels = [f"batch\n(day {r['eval_day']})" if r["phase"] == "batch" else f"{r['day']}\n(day {r['eval_day']})"
              for r in rows]
    models = ["teacher", base, *agg["variants"]]
    color = {m: f"C{i}" for i, m in enumerate(models)}  # one colour per model in both panels
    for v in agg["variants"]:
        g = np.array([r[f"{v}/gain"] for r in rows]) * 100
        se = np.array([r[f"{v}/gain_se"] or 0.0 for r in rows]) * 100
        ax1.errorbar(x, g, yerr=se, marker="o", capsize=3, label=v, color=color[v])
    ax1.axhline(0, color="grey", lw=0.8)
    ax1.set(ylabel=f"AUC gain over {base} (x100), mean ± SE over seeds", title="gain over the same-setting base")
    ax1.legend(fontsize=8)
    for m in models:
        ax2.plot(x, [r[f"{m}/auc"] for r in rows], marker="o", label=m, color=color[m])
    ax2.set(ylabel="next-day AUC (mean over seeds)", title="next-day AUC")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_xlabel("phase / streaming day (scored on)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1", help="comma-separated experiment seeds")
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "streaming_ablation"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script")
    ap.add_argument("--task", default="ctr")
    ap.add_argument("--out", default=None, help="result JSON (default results/streaming_ablation-<cpu>.json)")
    args = ap.parse_args()
    root = Path(args.run_dir) / ("quick" if args.quick else "full")
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {s: run_seed(s, root, args.quick, args.task) for s in seeds}

    import torch

    base = "base"
    agg = aggregate(runs, base, args.task)
    res = {"bench": "streaming_ablation", "device": cpu_name(), "python": platform.python_version(),
           "torch": torch.__version__, "quick": args.quick, "seeds": seeds, "task": args.task, "base": base,
           "configs": [str(c.relative_to(ROOT)) for c in CONFIGS], "overrides": QUICK if args.quick else [],
           "aggregate": agg, "per_seed": {str(s): {"days": r["days"], "batch": r["batch"], "join": r["join"],
                                                   "teacher": r["teacher"], "stream_seconds": r["seconds"],
                                                   "command": r["command"]} for s, r in runs.items()},
           "wall_s_this_invocation": time.perf_counter() - t0}
    path = write_result("streaming_ablation", res, args.quick, args.out)
    plot(agg, base, path.with_suffix(".png"), f"streaming ablation, {len(seeds)} seed(s), {cpu_name()}")
    print(" | ".join(["day (scored on)", "teacher gain"] + [f"{v} gain (share)" for v in agg["variants"]]))
    for r in agg["days"]:
        cells = [f"{r[f'{v}/gain'] * 100:+.3f}" + (f" ± {r[f'{v}/gain_se'] * 100:.3f}" if r[f"{v}/gain_se"] else "")
                 + (f" ({r[f'{v}/share_of_teacher_gain']:.0%})" if r[f"{v}/share_of_teacher_gain"] is not None else "")
                 for v in agg["variants"]]
        day = "batch" if r["phase"] == "batch" else str(r["day"])
        print(" | ".join([f"{day} ({r['eval_day']})", f"{(r['teacher/auc'] - r[f'{base}/auc']) * 100:+.3f}", *cells]))
    print(f"wrote {path}", file=sys.stderr)
    print(json.dumps({"mean_gain": agg["mean_gain"], "seeds": seeds, "result": str(path)}))


if __name__ == "__main__":
    main()
