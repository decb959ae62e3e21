"""Students over seeds on the robustness suite's teachers (issue 20): each world's transferability with its spread
over student seeds, and student-side variants compared on every world, without training a teacher again.

    python benchmarks/suite_students.py --teachers runs/robustness                     # default students, seeds 0,1,2
    python benchmarks/suite_students.py --teachers runs/robustness --variant default \\
        --variant dense_bins:student.dense=bins --seeds 0,1,2                          # a variant beside the default
    python benchmarks/suite_students.py --teachers runs/robustness --only pairwise --seeds 0   # one world, one seed

`--teachers` is a run directory of benchmarks/robustness.py: every world there whose run finished (report.md) is
used. Per world, variant and seed, `recdistill experiment` runs with that world's saved config, its teacher's signals
(`experiment.teacher_signals`, and its teacher evaluation beside them), `experiment.seed` = the seed and the
variant's overrides, no baselines, into <run-dir>/<variant>/<world>-seed<seed> (reused when it finished with the same
config). The default variant at the suite run's own seed is the suite run itself. A student run takes about a minute
on the 2-core box, so the whole suite over three seeds takes about half an hour per variant.

Per world and variant: base and distilled AUC, the gain with its paired bootstrap SE, and transferability, per seed
and as mean ± sd over seeds; over the suite: the median of the worlds' mean CTR transferability, the worlds whose
mean is below 50%, and the runs with a negative gain beyond two SEs on any task (the issue's targets, over seeds
instead of one). Result: results/suite_students-<cpu>.json and a PNG beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # robustness.py imports _common as a script does
from robustness import ORDER  # noqa: E402

from benchmarks._common import cpu_name  # noqa: E402
from benchmarks.paper_tables import aggregate, collect, fmt, log, run_experiment, save, subplots  # noqa: E402
from recdistill.config import load_config  # noqa: E402
from recdistill.report import markdown_table  # noqa: E402

DEFAULT = "default"


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """'name' or 'name:key=value,key=value' -> (name, overrides)."""
    name, _, sets = spec.partition(":")
    overrides = [s for s in sets.split(",") if s]
    bad = [s for s in overrides if "=" not in s]
    if not name or bad or (name == DEFAULT and overrides):
        raise argparse.ArgumentTypeError(f"--variant {spec!r}: expected NAME or NAME:KEY=VALUE[,KEY=VALUE...] (the "
                                         f"name '{DEFAULT}' takes no overrides)")
    return name, overrides


def finished_worlds(teachers: Path, only: list[str] | None) -> list[str]:
    """The worlds of a robustness run directory whose run finished, in the suite's order."""
    found = [d.name for d in teachers.iterdir() if (d / "report.md").exists() and (d / "signals").is_dir()]
    if only:
        missing = sorted(set(only) - set(found))
        if missing:
            raise SystemExit(f"--only: {missing} have no finished run under {teachers} (finished: {sorted(found)})")
        found = only
    return sorted(found, key=lambda w: (ORDER.index(w) if w in ORDER else len(ORDER), w))


def run_world(teachers: Path, root: Path, world: str, variant: str, sets: list[str], seed: int) -> Path:
    """The run directory of one world's students at one seed under one variant (run or reused)."""
    suite_run = teachers / world
    if variant == DEFAULT and load_config(suite_run / "config.yaml").experiment.seed == seed:
        return suite_run  # the suite's own students at its seed
    configs = [suite_run / "config.yaml"]
    overrides = [f"experiment.teacher_signals={(suite_run / 'signals').resolve()}", f"experiment.seed={seed}",
                 *sets]
    return run_experiment(root / variant, f"{world}-seed{seed}", configs, overrides)[0]


def world_summary(per_seed: dict[int, dict]) -> dict:
    """Mean ± sd over seeds of the distilled student's numbers per task, and each seed's negative-transfer check."""
    agg = aggregate(per_seed)
    dist = next(n for n, r in agg["students"].items() if r["base"] is not None)
    base = agg["students"][dist]["base"]
    out = {"student": dist, "teacher": agg["teacher"], "tasks": {}}
    for task, cell in agg["students"][dist]["tasks"].items():
        negative = [s for s, r in per_seed.items()
                    if r["students"][dist]["gain"][task] < -2 * (r["students"][dist]["gain_se"][task] or 0.0)]
        out["tasks"][task] = {**cell, "base_auc_mean": agg["students"][base]["tasks"][task]["auc_mean"],
                              "per_seed_transferability": {s: r["students"][dist]["transferability"][task]
                                                           for s, r in per_seed.items()},
                              "seeds_negative_beyond_2se": negative}
    return out


def ctr_cell(summary: dict) -> dict:
    """A world summary's cell of its first binary task (CTR), which the issue's targets are judged on."""
    return next(iter(summary["tasks"].values()))


def suite_targets(worlds: dict[str, dict]) -> dict:
    """The issue's transferability targets on the worlds' means over seeds (CTR: each world's first binary task)."""
    ctr = {w: ctr_cell(s)["transferability_mean"] for w, s in worlds.items()}
    valid = [v for v in ctr.values() if v is not None]
    return {"median_ctr_transferability": statistics.median(valid) if valid else None,
            "worlds_below_50pct": sorted(w for w, v in ctr.items() if v is None or v < 0.5),
            "negative_transfer_beyond_2se": {w: {t: c["seeds_negative_beyond_2se"] for t, c in s["tasks"].items()
                                                 if c["seeds_negative_beyond_2se"]}
                                             for w, s in worlds.items()
                                             if any(c["seeds_negative_beyond_2se"] for c in s["tasks"].values())}}


def table_md(res: dict) -> str:
    """One row per world: each variant's mean ± sd CTR transferability and mean gain (SE)."""
    rows = []
    names = list(res["variants"])
    for world in next(iter(res["variants"].values()))["worlds"]:
        row = {"world": world}
        for v in names:
            s = res["variants"][v]["worlds"].get(world)
            if s is None:
                row[v] = "-"
                continue
            c = ctr_cell(s)
            row[v] = (f"{fmt(c['transferability_mean'], '.0%')} ± {fmt(c['transferability_sd'], '.0%')} "
                      f"({fmt(c['base_auc_mean'])} -> {fmt(c['auc_mean'])})")
        rows.append(row)
    rows.append({"world": "**median**", **{v: fmt(res["variants"][v]["targets"]["median_ctr_transferability"], ".0%")
                                            for v in names}})
    return ("CTR transferability, mean ± sd over seeds (base -> distilled AUC, means)\n\n" + markdown_table(rows))


def plot(res: dict):  # noqa: ANN201 - a matplotlib Figure
    """Per world: each variant's seeds (dots) and mean (bar) of CTR transferability."""
    variants = list(res["variants"])
    worlds = list(next(iter(res["variants"].values()))["worlds"])
    fig, ax = subplots(figsize=(max(6.0, 0.9 * len(worlds) * max(len(variants), 1) + 2), 4.6))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        xs, means = [], []
        for j, w in enumerate(worlds):
            s = res["variants"][v]["worlds"].get(w)
            if s is None:
                continue
            c = ctr_cell(s)
            x = j + (i - (len(variants) - 1) / 2) * width
            xs.append(x)
            means.append(c["transferability_mean"] or 0.0)
            pts = [p for p in c["per_seed_transferability"].values() if p is not None]
            ax.scatter([x] * len(pts), pts, color="k", s=8, zorder=3)
        ax.bar(xs, means, width, alpha=0.7,
               label=f"{v} (median {fmt(res['variants'][v]['targets']['median_ctr_transferability'], '.0%')})")
    ax.set_xticks(range(len(worlds)), worlds, rotation=30, ha="right", fontsize=8)
    ax.axhline(0.5, color="grey", ls="--", lw=0.8)
    ax.axhline(0.7, color="grey", ls=":", lw=0.8)
    ax.set_ylabel("CTR transferability (dots: seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teachers", required=True, help="a benchmarks/robustness.py run directory (its --run-dir)")
    p.add_argument("--variant", action="append", type=parse_variant, default=None,
                   help=f"NAME or NAME:KEY=VALUE[,...] student overrides; repeatable (default: '{DEFAULT}')")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated student seeds (experiment.seed)")
    p.add_argument("--only", default=None, help="comma-separated worlds (default: every finished one)")
    p.add_argument("--run-dir", default="runs/suite_students", help="where the student runs go (resumable)")
    p.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/suite_students-<cpu>.json)")
    args = p.parse_args(argv)
    teachers = Path(args.teachers)
    if not teachers.is_dir():
        p.error(f"--teachers {teachers}: no such directory (run benchmarks/robustness.py --run-dir {teachers} first)")
    variants = dict(args.variant or [(DEFAULT, [])])
    seeds = [int(s) for s in args.seeds.split(",") if s]
    worlds = finished_worlds(teachers, [w for w in (args.only or "").split(",") if w] or None)
    log(f"{len(worlds)} worlds x {len(seeds)} seeds x {len(variants)} variants: {', '.join(worlds)}")
    res = {"bench": "suite_students", "device": cpu_name(), "cpus": os.cpu_count(), "teachers": str(teachers),
           "command": " ".join(["python benchmarks/suite_students.py", *(sys.argv[1:] if argv is None else argv)]),
           "seeds": seeds, "variants": {}}
    for name, sets in variants.items():
        per_world = {}
        for world in worlds:
            per_seed = {s: collect(run_world(teachers, Path(args.run_dir), world, name, sets, s)) for s in seeds}
            per_world[world] = world_summary(per_seed) | {"per_seed": per_seed}
        res["variants"][name] = {"sets": sets, "worlds": per_world, "targets": suite_targets(per_world)}
    res["markdown"] = table_md(res)
    print(res["markdown"])
    for name, v in res["variants"].items():
        t = v["targets"]
        print(f"{name}: median CTR transferability {fmt(t['median_ctr_transferability'], '.0%')}; below 50%: "
              f"{t['worlds_below_50pct'] or 'none'}; "
              f"negative beyond 2 SE: {t['negative_transfer_beyond_2se'] or 'none'}")
    return save("suite_students", res, False, args.out, plot(res))


if __name__ == "__main__":
    main()
