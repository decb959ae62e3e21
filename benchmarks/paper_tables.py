"""The paper's student-side tables on one teacher's signals, over seeds, with intervals (issue 18).

    python benchmarks/paper_tables.py --signals runs/demo-X/signals                       # every table, seeds 0,1,2
    python benchmarks/paper_tables.py --signals runs/demo-X/signals --tables cross_stage --seeds 0
    python benchmarks/paper_tables.py --quick --signals ...            # 2 days x 4,000 rows: checks the script

Each table is an experiment config (configs/experiments/<table>.yaml) run with `recdistill experiment` merged over
configs/demo.yaml on the given teacher signals (no teacher run: every table reads the same teacher), once per
`experiment.seed` (the students' initialisation and shuffling). Every distilled student is measured against the
base student of its own config (`base:`): per seed its AUC gain with the paired bootstrap standard error over the
evaluation rows, and its transferability; over seeds the mean and spread. A difference is called out only where
it clears both (|mean gain| > 2 x the larger of the seed spread and the mean bootstrap SE). Resumable: a seed
whose run wrote its report is reused. Result: JSON + PNG (benchmarks/results/paper_tables-<cpu>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import cpu_name, write_result  # noqa: E402
from recdistill.config import load_config  # noqa: E402
from recdistill.experiment import gain_bases  # noqa: E402
from recdistill.report import markdown_table  # noqa: E402
from recdistill.tracking import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("student_capacity", "cross_stage", "ablations")
QUICK = ["data.num_days=3", "data.samples_per_day=4000", "data.history_len=64", "student.history_summary=64",
         "student.export=false"]


def log(msg: str) -> None:
    print(f"[paper_tables {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fmt(v: float | None, spec: str = ".4f") -> str:
    """A table cell: `v` formatted, '-' when missing."""
    return "-" if v is None else format(v, spec)


def add_run_arguments(p: argparse.ArgumentParser, bench: str) -> None:
    """The arguments every student-table bench takes: seeds, run directory, overrides, --quick, --out."""
    p.add_argument("--seeds", default="0,1,2", help="student seeds (experiment.seed)")
    p.add_argument("--run-dir", default=f"runs/{bench}", help="where the runs go (reused when finished)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides for every run")
    p.add_argument("--quick", action="store_true", help="tiny data: checks the script, not a result")
    p.add_argument("--out", default=None, help=f"result JSON (default benchmarks/results/{bench}-<cpu>.json)")


def require_store(p: argparse.ArgumentParser, flag: str, path: str | None) -> None:
    """Exit with a usage error unless `path` (given as `flag`) is a committed teacher signal store."""
    if path is not None and not (Path(path) / "_commits").is_dir():
        p.error(f"{flag} {path}: not a committed teacher signal store (no _commits/)")


def subplots(*args, **kw):  # noqa: ANN002, ANN003, ANN201 - matplotlib's
    """plt.subplots on the file-only Agg backend (no display needed): (figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kw)


def save(bench: str, res: dict, quick: bool, out: str | None, fig) -> dict:  # noqa: ANN001 - a matplotlib Figure
    """Write the result JSON and `fig` as a PNG beside it (its path in res['plot']); returns `res`."""
    import matplotlib.pyplot as plt

    path = write_result(bench, res, quick=quick, out=out)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    plt.close(fig)
    res["plot"] = str(path.with_suffix(".png"))
    path.write_text(json.dumps(res, indent=2))
    log(f"wrote {path} and {res['plot']}")
    return res


def run_seed(args: argparse.Namespace, table: str, seed: int) -> tuple[Path, float | None]:
    """Run (or reuse) one table at one seed; returns its run directory and wall seconds (None when it was reused
    and its time was not recorded)."""
    configs = [ROOT / "configs" / "demo.yaml", ROOT / "configs" / "experiments" / f"{table}.yaml"]
    sets = [f"experiment.teacher_signals={Path(args.signals).resolve()}", f"experiment.seed={seed}",
            *(QUICK if args.quick else []), *args.set]
    return run_experiment(Path(args.run_dir), f"{table}-seed{seed}", configs, sets)


def run_experiment(root: Path, name: str, configs: list[Path], sets: list[str]) -> tuple[Path, float | None]:
    """Run (or reuse) `recdistill experiment` on `configs` + `sets` as run `root/name`, without baselines (the
    tables compare students and teachers; the baselines depend on neither); returns its run directory and wall
    seconds (None when it was reused and its time was not recorded). A finished run is reused only if its
    resolved config, tracking aside, is the one asked for."""
    run_dir = root / name
    sets = [*sets, f"tracking.run_dir={root.resolve()}", f"tracking.run_name={name}", "experiment.baselines=[]",
            "tracking.mode=disabled", "tracking.progress=false"]
    if (run_dir / "report.md").exists():
        # tracking and the count cache's place (a run sets it in its own directory) change no number
        ran, want = (c.model_dump(exclude={"tracking": True, "data": {"count_cache"}})
                     for c in (load_config(run_dir / "config.yaml"), load_config(configs, sets)))
        if ran != want:
            diff = sorted(k for k in want if ran.get(k) != want[k])
            raise SystemExit(f"{run_dir} ran another config than asked for now (sections {diff} differ); remove "
                             "it or give another --run-dir")
        log(f"{name}: reused {run_dir}")
        wall = Path(f"{run_dir}.wall_s")
        return run_dir, float(wall.read_text()) if wall.exists() else None
    cmd = [sys.executable, "-m", "recdistill.cli", "experiment", *[a for c in configs for a in ("--config", str(c))],
           *[a for s in sets for a in ("--set", s)]]
    log(f"{name}: running, log {run_dir}.log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(f"{run_dir}.log", "w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
    if rc or not (run_dir / "report.md").exists():
        raise SystemExit(f"{name}: recdistill experiment exited {rc}; see {run_dir}.log")
    wall = time.perf_counter() - t0
    Path(f"{run_dir}.wall_s").write_text(f"{wall:.1f}")  # kept for the result JSON when the run is reused
    return run_dir, wall


def collect(run_dir: Path) -> dict:
    """One run's per-student numbers: AUC and NE per binary task, served parameters, and for distilled students
    their base, gain, bootstrap SE and transferability."""
    cfg = load_config(run_dir / "config.yaml")
    _, s = read_metrics(run_dir)
    binary = [t.name for t in cfg.data.tasks if t.kind == "binary"]
    out = {"teacher": {t: s.get(f"teacher/auc/{t}") for t in binary}, "students": {}}
    bases = gain_bases(cfg.experiment)  # what the experiment measured each student from (bases: none)
    for st in cfg.experiment.students:
        n = st.name
        row = {"auc": {t: s.get(f"{n}/auc/{t}") for t in binary}, "ne": {t: s.get(f"{n}/ne/{t}") for t in binary},
               "served_params": s.get(f"{n}/model/served_params")}
        if bases.get(n, n) != n:
            row["base"] = bases[n]
            row["gain"] = {t: s[f"{n}/auc/{t}"] - s[f"{row['base']}/auc/{t}"] for t in binary}
            row["gain_se"] = {t: s.get(f"{n}/student_gain_se/{t}") for t in binary}
            row["transferability"] = {t: s.get(f"{n}/transferability/{t}") for t in binary}
        out["students"][n] = row
    return out


def _mean_sd(xs: list[float | None]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None and x == x]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def aggregate(per_seed: dict[int, dict]) -> dict:
    """Over seeds, per student and task: mean and sd of AUC, gain and transferability, the mean bootstrap SE and
    whether the gain clears the noise."""
    first = next(iter(per_seed.values()))
    tasks = list(first["teacher"])
    out = {"teacher": first["teacher"], "students": {}}
    for n, row in first["students"].items():
        agg = {"served_params": row["served_params"], "base": row.get("base"), "tasks": {}}
        for t in tasks:
            runs = [r["students"][n] for r in per_seed.values()]
            auc_m, auc_sd = _mean_sd([r["auc"][t] for r in runs])
            cell = {"auc_mean": auc_m, "auc_sd": auc_sd}
            if "gain" in row:
                g_m, g_sd = _mean_sd([r["gain"][t] for r in runs])
                se_m, _ = _mean_sd([r["gain_se"][t] for r in runs])
                tr_m, tr_sd = _mean_sd([r["transferability"][t] for r in runs])
                noise = max(g_sd or 0.0, se_m or 0.0)
                cell.update(gain_mean=g_m, gain_sd=g_sd, gain_se_mean=se_m, transferability_mean=tr_m,
                            transferability_sd=tr_sd, clears_noise=bool(g_m is not None and noise > 0
                                                                        and abs(g_m) > 2 * noise))
            agg["tasks"][t] = cell
        out["students"][n] = agg
    return out


def table_md(name: str, agg: dict, seeds: list[int]) -> str:
    """A markdown table of one experiment's distilled students."""
    rows = []
    for n, row in agg["students"].items():
        if row["base"] is None:
            continue
        for t, c in row["tasks"].items():
            mark = "" if c["clears_noise"] else " (within noise)"
            gain = f"{fmt(c['gain_mean'], '+.4f')} ± {fmt(c['gain_sd'])} ({fmt(c['gain_se_mean'])}){mark}"
            tr = f"{fmt(c['transferability_mean'], '.0%')} ± {fmt(c['transferability_sd'], '.0%')}"
            rows.append({"student": n, "served params": f"{row['served_params']:,}", "task": t,
                         "base AUC": fmt(agg["students"][row["base"]]["tasks"][t]["auc_mean"]),
                         "distilled AUC": fmt(c["auc_mean"]), "gain ± sd (SE)": gain, "transferability ± sd": tr})
    return (f"**{name}** (seeds {', '.join(map(str, seeds))}; mean ± sd over seeds; SE: mean paired bootstrap)\n\n"
            + markdown_table(rows))


def plot(tables: dict):  # noqa: ANN201 - a matplotlib Figure
    """Transferability (mean ± sd over seeds) per distilled student, one panel per table."""
    counts = [sum(r["base"] is not None for r in t["aggregate"]["students"].values()) for t in tables.values()]
    fig, axes = subplots(1, len(tables), figsize=(sum(2.0 + 0.9 * c for c in counts), 4.6), squeeze=False,
                             gridspec_kw={"width_ratios": [max(c, 2) for c in counts]})
    for ax, (name, t) in zip(axes[0], tables.items(), strict=True):
        agg = t["aggregate"]
        names = [n for n, r in agg["students"].items() if r["base"] is not None]
        tasks = list(agg["teacher"])
        width = 0.8 / len(tasks)
        for i, task in enumerate(tasks):
            m = [agg["students"][n]["tasks"][task]["transferability_mean"] or 0.0 for n in names]
            sd = [agg["students"][n]["tasks"][task]["transferability_sd"] or 0.0 for n in names]
            ax.bar([j + i * width for j in range(len(names))], m, width, yerr=sd, capsize=3, label=task)
        ax.set_xticks([j + width * (len(tasks) - 1) / 2 for j in range(len(names))],
                      [f"{n}\n{agg['students'][n]['served_params'] / 1e6:.2f}M" for n in names], fontsize=8,
                      rotation=20 if len(names) > 2 else 0, ha="right" if len(names) > 2 else "center")
        ax.axhline(0.5, color="grey", ls="--", lw=0.8)
        ax.set_title(name)
        ax.set_ylabel("transferability (vs same-config base)")
        ax.legend()
    return fig


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--signals", required=True, help="a finished teacher run's signal store (runs/demo-X/signals)")
    p.add_argument("--tables", default=",".join(TABLES), help=f"comma-separated, of {', '.join(TABLES)}")
    add_run_arguments(p, "paper_tables")
    args = p.parse_args(argv)
    tables = [t for t in args.tables.split(",") if t]
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        p.error(f"--tables: unknown {unknown}; choose from {list(TABLES)}")
    require_store(p, "--signals", args.signals)
    seeds = [int(s) for s in args.seeds.split(",")]
    res = {"bench": "paper_tables", "device": cpu_name(), "cpus": os.cpu_count(), "signals": str(args.signals),
           "command": " ".join(["python benchmarks/paper_tables.py", *(sys.argv[1:] if argv is None else argv)]),
           "quick": args.quick, "tables": {}}
    for table in tables:
        per_seed, walls = {}, {}
        for seed in seeds:
            run_dir, wall = run_seed(args, table, seed)
            per_seed[seed], walls[seed] = collect(run_dir), wall
        agg = aggregate(per_seed)
        res["tables"][table] = {"per_seed": per_seed, "wall_s": walls, "aggregate": agg,
                                "markdown": table_md(table, agg, seeds)}
        print(res["tables"][table]["markdown"] + "\n")
    return save("paper_tables", res, args.quick, args.out, plot(res["tables"]))


if __name__ == "__main__":
    main()
