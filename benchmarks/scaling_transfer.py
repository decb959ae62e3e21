"""Does scaling the teacher improve the served student? Each teacher axis, small and large, distilled into the same
student (issue 18; the paper: dense 1B -> 7B transfers 73%, sequence 5K -> 20K 61%, more data 67% -> 64%).

    python benchmarks/scaling_transfer.py                                   # every axis, student seeds 0,1,2
    python benchmarks/scaling_transfer.py --reference runs/demo-X/signals   # reuse a demo teacher as the reference
    python benchmarks/scaling_transfer.py --quick                           # tiny data: checks the script

Teachers (one seed each, the demo config plus the variant's overrides; each variant's dense lr is the one the
held-out selection of benchmarks/teacher_scaling.py chose for it, docs/RESULTS.md, Teacher scaling):

    axis     small                                        large
    history  teacher.history_len=128                      the reference (1,024 events)
    data     sampling.teacher.r=0.1 (lr 3e-3)              the reference (r = 0.5)
    dense    d_model 32, 1 layer, 103K (lr 3e-3)           d_model 128, 3 layers, 2.5M
    dense_nocross   the same pair without the teacher's crossed-feature tables (teacher.crosses=none)

Every teacher's signals train the demo's two students (base: labels only; distilled: decoupled towers) at each
student seed; the base does not depend on the teacher, so it is the same student in every variant. Per axis: each
teacher's gain over the base, each distilled student's gain and transferability, and the share of the teacher's
scaling gain that reaches the student, (distilled large - distilled small) / (teacher large - teacher small), per
student seed (paired: same seed, same base) and its mean and spread. The teachers are one seed each, so a share
is given only where the teacher's scaling gain is beyond twice the noise of a difference of two one-seed teachers
(TEACHER_SD, the run-to-run sd measured by benchmarks/teacher_scaling.py). Resumable: finished runs are
reused. Result: JSON + PNG (benchmarks/results/scaling_transfer-<cpu>.json).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import cpu_name  # noqa: E402
from benchmarks.paper_tables import (  # noqa: E402
    QUICK,
    _mean_sd,
    add_run_arguments,
    collect,
    fmt,
    require_store,
    run_experiment,
    save,
    subplots,
)
from recdistill.report import markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "reference": [],
    "history_128": ["teacher.history_len=128"],
    "data_r01": ["sampling.teacher.r=0.1", "teacher.lr=0.003"],
    "dense_small": ["teacher.d_model=32", "teacher.num_layers=1", "teacher.lr=0.003"],
    "dense_large": ["teacher.d_model=128", "teacher.num_layers=3"],
    # without the teacher's crossed-feature tables the three-field cell has to be learnt by the dense part, which
    # is where dense capacity paid before the crosses (docs/RESULTS.md, Teacher scaling); the student keeps its own
    "dense_small_nocross": ["teacher.d_model=32", "teacher.num_layers=1", "teacher.lr=0.003", "teacher.crosses=none"],
    "dense_large_nocross": ["teacher.d_model=128", "teacher.num_layers=3", "teacher.crosses=none"],
}
AXES = {"history": ("history_128", "reference"), "data": ("data_r01", "reference"),
        "dense": ("dense_small", "dense_large"), "dense_nocross": ("dense_small_nocross", "dense_large_nocross")}
#: Run-to-run sd of one teacher's next-day AUC on the demo world (pooled over six seed pairs, docs/RESULTS.md,
#: Teacher scaling: 0.0018 ctr / 0.0027 cvr). The difference of two one-seed teachers has sqrt(2) x that; a share
#: of the teacher's scaling gain is reported only where that gain is beyond twice its noise, else it divides by noise.
TEACHER_SD = {"ctr": 0.0018, "cvr": 0.0027}


def run_variant(args: argparse.Namespace, variant: str, seeds: list[int]) -> dict[int, dict]:
    """One teacher variant: its teacher (at the first seed's run, or --reference) and the students at every seed on
    its signals; returns collect() per seed."""
    configs = [ROOT / "configs" / "demo.yaml"]
    sets = [*VARIANTS[variant], *(QUICK if args.quick else []), *args.set]
    root = Path(args.run_dir)
    signals = Path(args.reference).resolve() if variant == "reference" and args.reference else None
    out = {}
    for seed in seeds:
        if signals is None:  # this run trains the teacher; the other seeds read its signals
            run_dir, _ = run_experiment(root, f"{variant}-seed{seed}", configs, [*sets, f"experiment.seed={seed}"])
            signals = run_dir / "signals"
        else:
            run_dir, _ = run_experiment(root, f"{variant}-seed{seed}", configs,
                                        [*sets, f"experiment.seed={seed}", f"experiment.teacher_signals={signals}"])
        out[seed] = collect(run_dir)
    return out


def axis_table(small: dict[int, dict], large: dict[int, dict], student: str = "distilled",
               base: str = "base") -> dict:
    """Per task: both teachers' AUC, the base's and both distilled students' mean AUC over seeds, their
    transferability (as each experiment measured it), and the share of the teacher's scaling gain the student keeps
    (per seed, then mean ± sd)."""
    seeds = sorted(set(small) & set(large))
    first = small[seeds[0]]
    out = {}
    for t in first["teacher"]:
        ts, tl = small[seeds[0]]["teacher"][t], large[seeds[0]]["teacher"][t]
        ds = [small[s]["students"][student]["auc"][t] for s in seeds]
        dl = [large[s]["students"][student]["auc"][t] for s in seeds]
        b = [small[s]["students"][base]["auc"][t] for s in seeds]
        share = [(y - x) / (tl - ts) if tl != ts else None for x, y in zip(ds, dl, strict=True)]
        cell = {"teacher_small": ts, "teacher_large": tl, "teacher_scaling_gain": tl - ts,
                "base_mean": _mean_sd(b)[0], "base_sd": _mean_sd(b)[1]}
        for k, runs, xs in (("small", small, ds), ("large", large, dl)):
            m, sd = _mean_sd(xs)
            trs = [runs[s]["students"][student]["transferability"][t] for s in seeds]
            # undefined (None: NaN in the summary) at a seed where this teacher does not beat that seed's base: a
            # mean over the other seeds would hide that, so the mean is given only where every seed has one
            undefined = sum(v is None or v != v for v in trs)
            tr = _mean_sd(trs) if not undefined else (None, None)
            cell.update({f"distilled_{k}_mean": m, f"distilled_{k}_sd": sd, f"transferability_{k}_mean": tr[0],
                         f"transferability_{k}_sd": tr[1], f"transferability_{k}_undefined_seeds": undefined})
        cell["student_scaling_gain_mean"], cell["student_scaling_gain_sd"] = _mean_sd(
            [y - x for x, y in zip(ds, dl, strict=True)])
        cell["share_kept_mean"], cell["share_kept_sd"] = _mean_sd(share)
        noise = 2 * 2 ** 0.5 * TEACHER_SD.get(t, max(TEACHER_SD.values()))
        cell["teacher_gain_threshold"], cell["teacher_gain_clears_noise"] = noise, abs(tl - ts) > noise
        out[t] = cell
    return out


def table_md(axes: dict, seeds: list[int]) -> str:
    rows = [{"axis": axis, "task": t,
             "teacher small -> large": f"{fmt(c['teacher_small'])} -> {fmt(c['teacher_large'])} "
                                       f"({fmt(c['teacher_scaling_gain'], '+.4f')})",
             "distilled small -> large": f"{fmt(c['distilled_small_mean'])} -> {fmt(c['distilled_large_mean'])} "
                                         f"({fmt(c['student_scaling_gain_mean'], '+.4f')} ± "
                                         f"{fmt(c['student_scaling_gain_sd'])})",
             "transferability small / large": " / ".join(
                 f"undefined at {c[f'transferability_{k}_undefined_seeds']} of {len(seeds)} seeds"
                 if c[f"transferability_{k}_undefined_seeds"] else fmt(c[f"transferability_{k}_mean"], ".0%")
                 for k in ("small", "large")),
             "share of the teacher's scaling gain kept":
                 f"{fmt(c['share_kept_mean'], '.0%')} ± {fmt(c['share_kept_sd'], '.0%')}"
                 if c["teacher_gain_clears_noise"] else
                 f"- (teacher gain within its noise, {c['teacher_gain_threshold']:.4f})"}
            for axis, tasks in axes.items() for t, c in tasks.items()]
    head = f"Student seeds {', '.join(map(str, seeds))} (mean ± sd); one teacher per variant."
    return f"{head}\n\n{markdown_table(rows)}"


def plot(axes: dict):  # noqa: ANN201 - a matplotlib Figure
    """Per axis and task: teacher and distilled student AUC, small vs large."""
    tasks = list(next(iter(axes.values())))
    fig, grid = subplots(len(tasks), len(axes), figsize=(3.6 * len(axes), 3.2 * len(tasks)), squeeze=False)
    for j, (axis, cells) in enumerate(axes.items()):
        for i, t in enumerate(tasks):
            c, ax = cells[t], grid[i][j]
            ax.plot([0, 1], [c["teacher_small"], c["teacher_large"]], "o-", label="teacher")
            ax.errorbar([0, 1], [c["distilled_small_mean"], c["distilled_large_mean"]],
                        yerr=[c["distilled_small_sd"] or 0, c["distilled_large_sd"] or 0], fmt="s-", capsize=3,
                        label="distilled student")
            ax.axhline(c["base_mean"], color="grey", ls="--", lw=0.8, label="base student")
            ax.set_xticks([0, 1], [AXES[axis][0], AXES[axis][1]], fontsize=8)
            kept = c["share_kept_mean"] if c["teacher_gain_clears_noise"] else None
            ax.set_title(f"{axis}: {t} (kept {kept:.0%})" if kept is not None else
                         f"{axis}: {t} (teacher gain within noise)", fontsize=9)
            ax.set_ylabel("next-day AUC")
            if i == j == 0:
                ax.legend(fontsize=7)
    return fig


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--axes", default=",".join(AXES), help=f"comma-separated, of {', '.join(AXES)}")
    p.add_argument("--reference", default=None, help="signals of a finished demo-config teacher run to reuse as the "
                   "reference teacher (else it is trained)")
    add_run_arguments(p, "scaling_transfer")  # --seeds: the students'; each variant's teacher trains at the first
    args = p.parse_args(argv)
    axes = [a for a in args.axes.split(",") if a]
    if unknown := [a for a in axes if a not in AXES]:
        p.error(f"--axes: unknown {unknown}; choose from {list(AXES)}")
    require_store(p, "--reference", args.reference)
    seeds = [int(s) for s in args.seeds.split(",")]
    res = {"bench": "scaling_transfer", "device": cpu_name(), "cpus": os.cpu_count(), "quick": args.quick,
           "command": " ".join(["python benchmarks/scaling_transfer.py", *(sys.argv[1:] if argv is None else argv)]),
           "variants": {}, "axes": {}}
    per_variant = {}
    for axis in axes:
        for v in AXES[axis]:
            if v not in per_variant:
                per_variant[v] = run_variant(args, v, seeds)
                res["variants"][v] = {"overrides": VARIANTS[v], "per_seed": per_variant[v]}
        res["axes"][axis] = axis_table(per_variant[AXES[axis][0]], per_variant[AXES[axis][1]])
    res["markdown"] = table_md(res["axes"], seeds)
    print(res["markdown"])
    return save("scaling_transfer", res, args.quick, args.out, plot(res["axes"]))


if __name__ == "__main__":
    main()
