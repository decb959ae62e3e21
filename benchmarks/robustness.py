"""Robustness suite (issue 20): the whole pipeline (`recdistill demo`: teacher, baselines, base and distilled
student) on each world of configs/worlds/, one table of the results and the issue's targets per world.

    python benchmarks/robustness.py                              # every world (about an hour on an idle 2-core box)
    python benchmarks/robustness.py --only pairwise,movielens    # some worlds
    python benchmarks/robustness.py --quick --only pairwise      # tiny sizes: a smoke test of the suite (~1 min)
    python benchmarks/robustness.py --run-dir runs/robustness    # again: finished worlds reused, others resumed

Each world runs as `recdistill demo --config configs/worlds/<world>.yaml` (merged over configs/demo.yaml) in a
subprocess, into <run-dir>/<world> (`tracking.run_name`), its console output in <run-dir>/<world>.log. A world
whose run finished (report.md written) is reused; one interrupted is continued with `recdistill demo --resume`
(the teacher from its newest checkpoint, the students again). The `parquet_byo` world reads a directory this
script writes first (prepare_byo): its world exported by `recdistill data export`, columns renamed to names of
their own and the recdistill.schema metadata (which names columns and roles) dropped, so only data.roles says
which column is the user, the item, the category.

Per world and binary task the table has the Bayes-optimal AUC (synthetic worlds), the AUC of baseline_lr,
baseline_gbdt, teacher, base and distilled student (a model a run did not have shows '-'), the teacher's lead over
the better baseline, transferability and NE per model, read from the run's metrics.jsonl summary; the
distilled-minus-base AUC difference gets the paired bootstrap standard error over the evaluation rows that the
experiment computed (`student_gain_se`, --bootstrap resamples). Targets (issue 20), met/missed per world:
teacher >= best baseline + 0.01 AUC on the first binary task (CTR); NE < 1 for every model and task;
CTR transferability >= 50%; no negative transfer beyond two standard errors on any task; over the suite, the
median CTR transferability >= 70%. Result: results/robustness-<cpu>[-quick].json (device, versions, each world's
config and overrides, numbers, wall time) and a PNG beside it; the table is printed, the last stdout line is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, cpu_name, write_result  # benchmarks/ is sys.path[0] when run as a script

from recdistill.config import load_config
from recdistill.experiment import load_preds
from recdistill.report import markdown_table
from recdistill.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
WORLDS = ROOT / "configs" / "worlds"
DEMO = ROOT / "configs" / "demo.yaml"
#: Run order (the suite may be cut short: the demo world and the hard case first); other files in configs/worlds/
#: run after these, by name.
ORDER = ("pairwise", "default3way", "large_vocab", "long_history", "short_history", "dense_signal", "strong_drift",
         "rare_positive", "traffic_mix", "one_task", "movielens", "parquet_byo")
COMMON = ["tracking.progress=false"]
#: --quick: every world at a size a test runs in about a minute (the world's own knobs stay, its sizes shrink).
QUICK = ["teacher.preset=tiny", "data.num_days=3", "data.samples_per_day=6000", "data.history_len=64",
         "teacher.history_len=64", "student.history_len=16", "data.batch_size=128", "student.batch_size=128",
         "data.world.num_users=400", "data.world.num_items=800"]
#: --quick per world: MovieLens has no samples_per_day (its size is the dataset's): more, smaller buckets and one of
#: them for the students.
QUICK_WORLD = {"movielens": ["data.num_days=12", "student.train_days=1"]}
BYO = "parquet_byo"
#: parquet_byo's renames (the world's export -> its "own" names); data.roles in configs/worlds/parquet_byo.yaml
#: names the new ones. hist_item keeps its name: the layout requires it.
RENAME = {"sparse_user_id": "sparse_user", "sparse_item_id": "sparse_item", "sparse_item_cat": "sparse_cat",
          "sparse_item_tags": "sparse_tags", "sparse_user_segment": "sparse_user_group",
          "sparse_item_segment": "sparse_item_group", "sparse_context_slot": "sparse_daypart",
          "sparse_traffic_source": "sparse_channel", "hist_cat": "hist_genre", "hist_action": "hist_event",
          "hist_ts": "hist_time"}
MODELS = ("baseline_lr", "baseline_gbdt", "teacher")  # then the students, base first


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
    """Versions of what the numbers depend on."""
    import deepspeed
    import torch
    import torchrec

    return {"python": platform.python_version(), "torch": torch.__version__, "torchrec": torchrec.__version__,
            "deepspeed": deepspeed.__version__, "numpy": np.__version__}


def world_names() -> list[str]:
    """Every world of configs/worlds/, in run order."""
    names = sorted(p.stem for p in WORLDS.glob("*.yaml"))
    return [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help="comma-separated worlds (default: all of configs/worlds/)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the suite")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every world (after its config)")
    p.add_argument("--run-dir", default=str(ROOT / "runs" / "robustness"), help="one run directory per world "
                   "under it; run again with the same one to reuse finished worlds and resume the others")
    p.add_argument("--out", default=None, help="result JSON path (default benchmarks/results/robustness-<cpu>.json)")
    p.add_argument("--bootstrap", type=int, default=200, help="resamples of the paired bootstrap")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    known = world_names()
    args.worlds = args.only.split(",") if args.only else known
    unknown = [w for w in args.worlds if w not in known]
    if unknown:
        p.error(f"--only: no world {unknown} in {WORLDS} (worlds: {', '.join(known)})")
    return args


def world_overrides(args: argparse.Namespace, world: str, root: Path) -> list[str]:
    """The --set overrides of one world's run: run directory and name, quick sizes, the user's own."""
    quick = [*QUICK, *QUICK_WORLD.get(world, [])] if args.quick else []
    over = [*COMMON, f"tracking.run_dir={root}", f"tracking.run_name={world}",
            f"experiment.bootstrap={40 if args.quick else args.bootstrap}", *quick]
    if world == BYO:
        over.append(f"data.path={root / (BYO + '.data')}")
    return [*over, *args.overrides]


def prepare_byo(args: argparse.Namespace, root: Path) -> None:
    """Write parquet_byo's directory (kept once complete): the world of configs/worlds/parquet_byo.yaml exported
    as synthetic data, then every file rewritten with the RENAME column names and without recdistill.schema."""
    import pyarrow.parquet as pq

    out = root / (BYO + ".data")
    sets = [o for o in world_overrides(args, BYO, root) if not o.startswith(("tracking.run", "data.path"))]
    done = out / "_COMPLETE"  # not *.parquet: the reader ignores it
    if done.exists() and json.loads(done.read_text()) == sets:
        return
    tmp = root / (BYO + ".data.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "recdistill.cli", "data", "export", str(tmp), "--config", str(DEMO),
           "--config", str(WORLDS / f"{BYO}.yaml"), *[a for o in sets for a in ("--set", o)],
           "--set", "data.source=synthetic"]
    log(f"{BYO}: exporting its world to {tmp}")
    subprocess.run(cmd, check=True, env=_env(), stdout=subprocess.DEVNULL)
    for f in sorted(tmp.rglob("*.parquet")):
        table = pq.ParquetFile(f).read()  # the file alone: read_table would add a `day` column from its path
        meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != b"recdistill.schema"}
        table = table.rename_columns([RENAME.get(c, c) for c in table.column_names]).replace_schema_metadata(meta)
        pq.write_table(table, f)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    done.write_text(json.dumps(sets))


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def run_world(args: argparse.Namespace, world: str, root: Path) -> dict:
    """Run (or reuse, or resume) one world; returns {'status', 'overrides', 'attempts': [{'mode', 'wall_s', 'rc'}]}."""
    run_dir, state_path = root / world, root / f"{world}.state.json"
    over = world_overrides(args, world, root)
    state = json.loads(state_path.read_text()) if state_path.exists() else {"overrides": over, "attempts": []}
    if state["overrides"] != over:
        raise SystemExit(f"{run_dir} was run with other overrides ({state['overrides']}); give another --run-dir")
    if (run_dir / "report.md").exists():
        log(f"{world}: finished in {run_dir}: reused")
        return {**state, "status": "finished"}
    if world == BYO:
        prepare_byo(args, root)
    if (run_dir / "config.yaml").exists():
        mode, cmd = "resume", ["--resume", str(run_dir), *[a for o in COMMON for a in ("--set", o)]]
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a start that died before it saved its config: nothing to keep
        mode, cmd = "new", ["--config", str(WORLDS / f"{world}.yaml"), *[a for o in over for a in ("--set", o)]]
    log(f"{world}: {mode} run in {run_dir}, log {root / (world + '.log')}")
    t0 = time.perf_counter()
    with open(root / f"{world}.log", "a") as out:
        rc = subprocess.run([sys.executable, "-m", "recdistill.cli", "demo", *cmd], stdout=out,
                            stderr=subprocess.STDOUT, env=_env(), cwd=ROOT).returncode
    state["attempts"].append({"mode": mode, "wall_s": time.perf_counter() - t0, "rc": rc})
    state_path.write_text(json.dumps(state, indent=2))
    ok = rc == 0 and (run_dir / "report.md").exists()
    log(f"{world}: {'done' if ok else f'failed (exit {rc}; see the log)'} in {state['attempts'][-1]['wall_s']:.0f} s")
    return {**state, "status": "finished" if ok else "failed"}


def collect(run_dir: Path) -> dict:
    """One finished run's numbers: per binary task the AUC / NE of every model it has, the Bayes-optimal AUC,
    transferability and the bootstrap SE of the distilled-minus-base AUC difference; plus its config."""
    cfg = load_config(run_dir / "config.yaml")
    _, summary = read_metrics(run_dir)
    base = cfg.experiment.base_student
    distilled = [s.name for s in cfg.experiment.students if s.name != base]
    models = [*MODELS, base, *distilled]
    binary = [t.name for t in cfg.data.tasks if t.kind == "binary"]
    tasks = {}
    for t in binary:
        row = {"bayes_auc": summary.get(f"{base}/bayes_auc/{t}"),
               "auc": {m: summary.get(f"{m}/auc/{t}") for m in models},
               "ne": {m: summary.get(f"{m}/ne/{t}") for m in models}}
        if distilled:
            d = distilled[0]
            row["transferability"] = summary.get(f"{d}/transferability/{t}")
            row["distilled_minus_base"] = _sub(row["auc"][d], row["auc"][base])
            # the experiment's paired bootstrap (experiment.bootstrap resamples, set by world_overrides)
            row["distilled_minus_base_se"] = summary.get(f"{d}/student_gain_se/{t}")
        tasks[t] = row
    return {"source": cfg.data.source, "base": base, "distilled": distilled[:1], "tasks": tasks,
            "eval_rows": int(len(load_preds(run_dir / "students" / f"{base}.eval_preds.npz")["sample_id"])),
            "data": cfg.data.model_dump(mode="json", exclude={"roles"} if cfg.data.source != "parquet" else None),
            "teacher": {k: getattr(cfg.teacher, k) for k in ("preset", "history_len", "lr")},
            "times": {k[len("time/"):]: v for k, v in summary.items() if k.startswith("time/")}}


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def teacher_margin(task: dict) -> float | None:
    """Teacher AUC minus the better baseline's on one task's row (None: no teacher or no baseline)."""
    baselines = [v for m, v in task["auc"].items() if m.startswith("baseline_") and v is not None]
    teacher = task["auc"]["teacher"]
    return None if not baselines or teacher is None else teacher - max(baselines)


def targets(res: dict) -> dict[str, bool | None]:
    """The issue's per-world targets, met (True), missed (False) or not measurable (None: a number is missing)."""
    tasks = res["tasks"]
    first = next(iter(tasks))
    ctr = tasks[first]
    margin = teacher_margin(ctr)
    nes = [v for r in tasks.values() for v in r["ne"].values() if v is not None]
    tr = ctr.get("transferability")
    neg = [r["distilled_minus_base"] >= -2 * r["distilled_minus_base_se"] for r in tasks.values()
           if r.get("distilled_minus_base") is not None and np.isfinite(r.get("distilled_minus_base_se", np.nan))]
    return {"teacher_beats_best_baseline_by_0.01": None if margin is None else bool(margin >= 0.01),
            "ne_below_1_everywhere": bool(max(nes) < 1) if nes else None,
            "ctr_transferability_at_least_50pct": None if tr is None or not np.isfinite(tr) else bool(tr >= 0.5),
            "no_negative_transfer_beyond_2se": bool(all(neg)) if neg else None}


def _fmt(v: float | None, fmt: str = "{:.4f}") -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else fmt.format(v)


def tables(worlds: dict) -> tuple[str, str]:
    """(the results table: a row per world and binary task; the targets table: a row per world)."""
    rows, trows = [], []
    for name, w in worlds.items():
        if "result" not in w:
            trows.append({"world": name, "status": w["status"]})
            continue
        r = w["result"]
        for t, row in r["tasks"].items():
            a, d = row["auc"], (r["distilled"] or [None])[0]
            rows.append({"world": name, "task": t, "bayes": _fmt(row["bayes_auc"]),
                         "baseline_lr": _fmt(a["baseline_lr"]), "baseline_gbdt": _fmt(a["baseline_gbdt"]),
                         "teacher": _fmt(a["teacher"]), "teacher - best": _fmt(teacher_margin(row), "{:+.4f}"),
                         "base": _fmt(a[r["base"]]),
                         "distilled": _fmt(a.get(d)), "d-b (se)": f"{_fmt(row.get('distilled_minus_base'), '{:+.4f}')}"
                         f" ({_fmt(row.get('distilled_minus_base_se'))})",
                         "transfer": _fmt(row.get("transferability"), "{:.0%}"),
                         "NE lr/gbdt/teacher/base/distilled": "/".join(_fmt(row["ne"].get(m), "{:.3f}")
                                                                       for m in (*MODELS, r["base"], d))})
        mark = {True: "met", False: "missed", None: "-"}
        trows.append({"world": name, "status": w["status"],
                      **{k: mark[v] for k, v in w["targets"].items()}, "wall_s": f"{w['wall_s']:.0f}"})
    return markdown_table(rows) if rows else "(no finished world)", markdown_table(trows)


def plot(path: Path, worlds: dict) -> Path:
    """Per world (first binary task): teacher, best baseline, base and distilled AUC (Bayes-optimal as a tick), and
    the transferability with the 50% / 70% targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {n: w["result"] for n, w in worlds.items() if "result" in w}
    names = list(done)
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(max(6.4, 1.1 * len(names) + 2), 7.5), dpi=110)
    series: dict[str, list[float]] = {"teacher": [], "best baseline": [], "base student": [], "distilled student": []}
    bayes = []
    for r in done.values():
        row = next(iter(r["tasks"].values()))
        a = row["auc"]
        best = max([v for m, v in a.items() if m.startswith("baseline_") and v is not None], default=None)
        for key, v in zip(series, (a["teacher"], best, a[r["base"]], a.get((r["distilled"] or [""])[0])),
                          strict=True):
            series[key].append(np.nan if v is None else v)
        bayes.append(np.nan if row["bayes_auc"] is None else row["bayes_auc"])
    width = 0.8 / len(series)
    for i, (key, ys) in enumerate(series.items()):
        ax.bar(np.arange(len(names)) + (i - 1.5) * width, ys, width=width, label=key)
    ax.scatter(np.arange(len(names)), bayes, marker="_", s=400, color="black", label="Bayes-optimal", zorder=3)
    finite = [v for ys in [*series.values(), bayes] for v in ys if np.isfinite(v)]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 0.03), min(1.0, max(finite) + 0.02))
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("next-day AUC (first binary task)")
    ax.legend(fontsize=7, ncol=5, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    tr = [next(iter(r["tasks"].values())).get("transferability") for r in done.values()]
    bx.bar(np.arange(len(names)), [np.nan if v is None else v for v in tr], color="tab:purple")
    for level in (0.5, 0.7):
        bx.axhline(level, ls="--", lw=0.8, color="gray")
    bx.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    bx.set_ylabel("transferability (CTR)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def summarise(args: argparse.Namespace, root: Path, worlds: dict, t0: float) -> dict:
    """The result document: provenance, each world's config, numbers, targets and wall time, and the suite's."""
    trs = [w["result"]["tasks"][next(iter(w["result"]["tasks"]))].get("transferability") for w in worlds.values()
           if "result" in w]
    trs = [v for v in trs if v is not None and np.isfinite(v)]
    median = float(np.median(trs)) if trs else None
    return {"bench": "robustness", "quick": args.quick, "device": cpu_name(), "cpu_count": os.cpu_count(),
            "versions": versions(), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(["python", "benchmarks/robustness.py", *args.argv]),
            "run_dir": str(root), "overrides": args.overrides, "wall_s": time.perf_counter() - t0,
            "worlds": worlds,
            "suite_targets": {"median_ctr_transferability": median,
                              "median_ctr_transferability_at_least_70pct": None if median is None
                              else bool(median >= 0.7)}}


def main(argv: list[str] | None = None) -> dict:
    """Run every world (reusing and resuming), then collect, tabulate, plot and write the result."""
    args = parse_args(argv)
    root = Path(args.run_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    worlds: dict = {}
    name = "robustness"
    for world in args.worlds:
        state = run_world(args, world, root)
        entry = {"config": str((WORLDS / f"{world}.yaml").relative_to(ROOT)), **state,
                 "wall_s": sum(a["wall_s"] for a in state["attempts"])}
        if state["status"] == "finished":
            entry["result"] = collect(root / world)
            entry["targets"] = targets(entry["result"])
        worlds[world] = entry
        write_result(name, summarise(args, root, worlds, t0), args.quick, args.out)  # partial: the suite may stop
    doc = summarise(args, root, worlds, t0)
    path = write_result(name, doc, args.quick, args.out)
    png = plot(path.with_suffix(".png"), worlds)
    results, goals = tables(worlds)
    print(results + "\n\n" + goals + "\n")
    suite = doc["suite_targets"]
    print(f"median CTR transferability over worlds: {_fmt(suite['median_ctr_transferability'], '{:.0%}')} "
          f"(target >= 70%: {suite['median_ctr_transferability_at_least_70pct']})\n")
    print(json.dumps({"result": str(path), "plot": str(png), "suite_targets": doc["suite_targets"],
                      "targets": {n: w.get("targets") for n, w in worlds.items()}}))
    return doc


if __name__ == "__main__":
    RESULTS.mkdir(parents=True, exist_ok=True)
    main()
