"""Where decoupled towers matter: the served tower distilled directly (single tower) vs kept on labels (decoupled),
when the teacher's signals are biased, noisy or partly garbage (issue 18; the paper: decoupled +0.44% vs single
+0.36%).

    python benchmarks/decoupled_regime.py --signals runs/demo-X/signals            # seeds 0,1,2
    python benchmarks/decoupled_regime.py --signals ... --quick --seeds 0           # tiny data: checks the script

On clean signals of the demo teacher the two designs are close (docs/RESULTS.md, Paper tables). Here the same
signals are damaged in the ways a production teacher's go wrong, each written as a store of its own next
to the run (same sample ids, windows and teacher metadata; only the logits change):

    clean     the store as it is
    bias      every logit + BIAS (a teacher whose calibration moved: a sampling rate changed and not recorded)
    noise     + Gaussian noise of NOISE x the store's logit sd per task (a teacher that is partly stale or wrong)
    garbage   GARBAGE of the rows get another row's logits (a join or writer bug: plausible values, no information)

Students (configs/demo.yaml, beta 100, exact debias): the base (labels only), and per damage a decoupled student
(the served main tower on labels, the aux tower on labels + beta x distillation) and a single-tower student
(labels + beta x distillation on the served tower), each reading that damage's store. Per seed: AUC and NE of the
served tower, gain over the base with its paired bootstrap SE; over seeds mean ± sd, and decoupled − single per
damage, paired by seed. Resumable. Result: JSON + PNG (benchmarks/results/decoupled_regime-<cpu>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import fsspec
import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import cpu_name  # noqa: E402
from benchmarks.paper_tables import (  # noqa: E402
    QUICK,
    _mean_sd,
    add_run_arguments,
    collect,
    fmt,
    log,
    require_store,
    run_experiment,
    save,
    subplots,
)
from recdistill.report import markdown_table, zoomed_ylim  # noqa: E402
from recdistill.signals.reader import SignalReader  # noqa: E402
from recdistill.signals.schema import list_commits  # noqa: E402
from recdistill.signals.writer import SignalWriter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DAMAGES = ("clean", "bias", "noise", "garbage")
BIAS, NOISE, GARBAGE = 1.0, 1.0, 0.3


def damage(z: np.ndarray, kind: str, sd: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Damaged copy of raw logits z [n, T] (module docstring); `sd` [T]: the whole store's logit sd per task."""
    if kind == "bias":
        return z + BIAS
    if kind == "noise":
        return z + rng.standard_normal(z.shape).astype(z.dtype) * (NOISE * sd).astype(z.dtype)
    if kind == "garbage":
        out = z.copy()
        rows = np.flatnonzero(rng.random(len(z)) < GARBAGE)
        out[rows] = z[rng.permutation(rows)]
        return out
    raise ValueError(f"unknown damage {kind!r}; choose from {DAMAGES}")


def write_damaged(src: Path, dst: Path, kind: str, seed: int = 0) -> Path:
    """Write the `kind`-damaged copy of the signal store `src` to `dst` window by window (reused when complete)."""
    done = dst / "_damage.json"
    if done.exists() and json.loads(done.read_text()) == {"src": str(src), "kind": kind, "seed": seed}:
        return dst
    fs, root = fsspec.core.url_to_fs(str(src))
    windows, meta = {}, None
    for window in sorted({w for w, _ in list_commits(fs, root)}):  # each shard read once, window by window
        r = SignalReader(str(src), windows=[window])
        ids = torch.from_numpy(np.sort(r.sample_ids))
        z, found = r.lookup(ids)
        windows[window], meta = (ids[found], z[found].numpy()), r.meta
    sd = np.concatenate([z for _, z in windows.values()]).std(0)  # the noise scale: the whole store's sd per task
    rng = np.random.default_rng(seed)
    with SignalWriter(str(dst), 0, meta) as w:
        for window, (ids, z) in windows.items():
            w.begin_window(window)
            w.write(ids, torch.from_numpy(damage(z, kind, sd, rng)), window)
            w.commit_window()
    done.write_text(json.dumps({"src": str(src), "kind": kind, "seed": seed}))
    return dst


def students_config(stores: dict[str, Path], path: Path) -> Path:
    """An experiment config: the base and, per damage, a decoupled and a single-tower student on its store."""
    students = [{"name": "base", "set": ["student.towers=single", "student.tower_loss=task"]}]
    for kind, store in stores.items():
        for towers in ("decoupled", "single"):
            students.append({"name": f"{towers}_{kind}", "base": "base",
                             "set": [f"student.towers={towers}", "student.tower_loss=task+distill",
                                     f"student.signals_uri={store}"]})
    path.write_text(yaml.safe_dump({"experiment": {"name": "decoupled_regime", "base_student": "base",
                                                   "students": students}}, sort_keys=False))
    return path


def summarise(per_seed: dict[int, dict]) -> dict:
    """Per damage and task: both designs' AUC, NE and gain over the base (mean ± sd over seeds) and decoupled −
    single, paired by seed."""
    seeds = sorted(per_seed)
    tasks = list(per_seed[seeds[0]]["teacher"])
    kinds = sorted({n.split("_", 1)[1] for n in per_seed[seeds[0]]["students"] if n != "base"},
                   key=DAMAGES.index)
    students = {s: per_seed[s]["students"] for s in seeds}
    out = {}
    for kind in kinds:
        out[kind] = {}
        for t in tasks:
            cell = {}
            for towers in ("decoupled", "single"):
                for key in ("auc", "gain", "gain_se", "ne"):
                    xs = [students[s][f"{towers}_{kind}"][key][t] for s in seeds]
                    cell[f"{towers}_{key}_mean"], cell[f"{towers}_{key}_sd"] = _mean_sd(xs)
            for key in ("auc", "ne"):
                d = [students[s][f"decoupled_{kind}"][key][t] - students[s][f"single_{kind}"][key][t] for s in seeds]
                cell[f"diff_{key}_mean"], cell[f"diff_{key}_sd"] = _mean_sd(d)
                cell[f"diff_{key}_per_seed"] = d
                cell[f"base_{key}_mean"] = _mean_sd([students[s]["base"][key][t] for s in seeds])[0]
            out[kind][t] = cell
    return out


def table_md(summary: dict, seeds: list[int]) -> str:
    rows = [{"signals": kind, "task": t,
             "base AUC / NE": f"{fmt(c['base_auc_mean'])} / {fmt(c['base_ne_mean'], '.3f')}",
             "decoupled AUC / NE": f"{fmt(c['decoupled_auc_mean'])} / {fmt(c['decoupled_ne_mean'], '.3f')}",
             "single AUC / NE": f"{fmt(c['single_auc_mean'])} / {fmt(c['single_ne_mean'], '.3f')}",
             "decoupled − single AUC": f"{fmt(c['diff_auc_mean'], '+.4f')} ± {fmt(c['diff_auc_sd'])}",
             "decoupled − single NE": f"{fmt(c['diff_ne_mean'], '+.3f')} ± {fmt(c['diff_ne_sd'], '.3f')}"}
            for kind, tasks in summary.items() for t, c in tasks.items()]
    head = f"Seeds {', '.join(map(str, seeds))}: mean ± sd; decoupled − single paired by seed."
    return f"{head}\n\n{markdown_table(rows)}"


def plot(summary: dict):  # noqa: ANN201 - a matplotlib Figure
    """Per task: served-tower AUC and NE of both designs per damage, the base as a line."""
    tasks = list(next(iter(summary.values())))
    fig, grid = subplots(2, len(tasks), figsize=(4.2 * len(tasks), 6.4), squeeze=False)
    kinds = list(summary)
    x = np.arange(len(kinds))
    for j, t in enumerate(tasks):
        for i, (key, label) in enumerate((("auc", "served-tower AUC"), ("ne", "served-tower NE"))):
            ax = grid[i][j]
            for k, towers in enumerate(("decoupled", "single")):
                m = [summary[kd][t][f"{towers}_{key}_mean"] for kd in kinds]
                sd = [summary[kd][t][f"{towers}_{key}_sd"] or 0 for kd in kinds]
                ax.bar(x + 0.38 * k, m, 0.38, yerr=sd, capsize=3, label=towers)
            ax.axhline(summary[kinds[0]][t][f"base_{key}_mean"], color="grey", ls="--", lw=0.8, label="base")
            ax.set_xticks(x + 0.19, kinds)
            shown = [summary[kd][t][f"{tw}_{key}_mean"] for kd in kinds for tw in ("decoupled", "single")]
            ax.set_ylim(zoomed_ylim([*shown, summary[kinds[0]][t][f"base_{key}_mean"]]))
            ax.set_title(f"{t}: {label}", fontsize=9)
            if i == j == 0:
                ax.legend(fontsize=7)
    return fig


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--signals", required=True, help="a finished demo-config teacher run's signal store")
    p.add_argument("--damages", default=",".join(DAMAGES), help=f"comma-separated, of {', '.join(DAMAGES)}")
    add_run_arguments(p, "decoupled_regime")  # the damaged stores go into --run-dir too
    args = p.parse_args(argv)
    kinds = [k for k in args.damages.split(",") if k]
    if unknown := [k for k in kinds if k not in DAMAGES]:
        p.error(f"--damages: unknown {unknown}; choose from {list(DAMAGES)}")
    require_store(p, "--signals", args.signals)
    src = Path(args.signals).resolve()
    root = Path(args.run_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    stores = {}
    for kind in kinds:
        stores[kind] = src if kind == "clean" else write_damaged(src, root / f"signals-{kind}", kind)
        log(f"signals {kind}: {stores[kind]}")
    config = students_config(stores, root / "decoupled_regime.yaml")
    configs = [ROOT / "configs" / "demo.yaml", config]
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed, walls = {}, {}
    for seed in seeds:
        run_dir, walls[seed] = run_experiment(root, f"seed{seed}", configs, [
            f"experiment.teacher_signals={src}", f"experiment.seed={seed}", *(QUICK if args.quick else []),
            *args.set])
        per_seed[seed] = collect(run_dir)
    summary = summarise(per_seed)
    res = {"bench": "decoupled_regime", "device": cpu_name(), "cpus": os.cpu_count(), "quick": args.quick,
           "command": " ".join(["python benchmarks/decoupled_regime.py", *(sys.argv[1:] if argv is None else argv)]),
           "signals": str(src), "damage": {"bias": BIAS, "noise_sd_x": NOISE, "garbage_share": GARBAGE},
           "wall_s": walls, "per_seed": per_seed, "summary": summary,
           "markdown": table_md(summary, seeds)}
    print(res["markdown"])
    return save("decoupled_regime", res, args.quick, args.out, plot(summary))


if __name__ == "__main__":
    main()
