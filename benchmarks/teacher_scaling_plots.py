"""The plots of benchmarks/teacher_scaling.py, drawn from its result document (so a finished JSON can be re-plotted).

    plot_all(path, res, binary, selection)   # <stem>.png, -axes.png, -capture.png (synthetic world), -lr.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def seed_runs(name: str, names) -> list[str]:  # noqa: ANN001 - any iterable of variant names
    """`name` and its seed repeats `name_seed1`, ... among `names` (name first if present)."""
    return [n for n in names if n == name] + sorted(n for n in names if n.startswith(name + "_seed"))


def plot_all(path: Path, res: dict, binary: list[str], selection: dict | None) -> Path:
    """Every plot of a finished grid beside its result JSON `path`; returns the main (AUC bars) PNG."""
    png = plot(path.with_suffix(".png"), res, binary)
    if res["base"]["capture_ctr"]:
        plot_capture(path.with_name(path.stem + "-capture.png"), res)
    plot_axes(path.with_name(path.stem + "-axes.png"), res, binary[0])
    if selection:
        plot_lr_selection(path.with_name(path.stem + "-lr.png"), selection, binary)
    return png


def plot(path: Path, res: dict, binary: list[str]) -> Path:
    """AUC per model and task, the Bayes-optimal AUC as a dashed line."""
    from recdistill.report import plot_bars

    series = {"base (student)": [res["base"]["eval"][f"auc/{t}"] for t in binary]}
    for name, r in res["variants"].items():
        if "eval" in r:
            series[name] = [r["eval"][f"auc/{t}"] for t in binary]
    return plot_bars(path, binary, series, title="Teacher scaling: next-day AUC (unsampled eval day)",
                     ylabel="AUC", ref={"Bayes-optimal": [res["bayes"][f"auc/{t}"] for t in binary]},
                     value_fmt="{:.4f}")


# per axis panel: x label, the variants on it, where a row keeps its x value, x log base, and side points that
# are drawn but not on the line (dense_longer scales LONGER, the line is TokenMixer size)
AXIS_PANELS = {
    "(a) dense size": ("dense parameters (TokenMixer + LONGER + heads)",
                       ["dense_small", "reference", "dense_large", "dense_longer"], lambda r: r["dense_params"], 10,
                       {"dense_longer"}),
    "(b) history length": ("history events", ["history_short", "reference"], lambda r: r["shape"]["history_len"],
                           2, set()),
    "(c) data: negative keep-rate r": ("r (every positive kept)", ["data_r01", "data_r025", "reference", "data_r1"],
                                       lambda r: r["sampling_teacher"]["r"], 2, set()),
}


def plot_axes(path: Path, res: dict, task: str) -> Path:
    """One panel per scaling axis: next-day AUC (every seed a dot, the seed mean a line) against the axis value;
    the base student as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {n: r for n, r in res["variants"].items() if "eval" in r}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), dpi=110, sharey=True)
    for ax, (title, (xlabel, names, x_of, log_base, side)) in zip(axes, AXIS_PANELS.items(), strict=True):
        pts = []
        for n in names:
            runs = seed_runs(n, rows)
            if not runs:
                continue
            x = x_of(rows[runs[0]])
            aucs = [rows[m]["eval"][f"auc/{task}"] for m in runs]
            ax.scatter([x] * len(aucs), aucs, color="tab:blue", s=18, zorder=3)
            pts.append((x, float(np.mean(aucs)), n))
            if side or log_base == 10:
                ax.annotate(n, (x, pts[-1][1]), textcoords="offset points", xytext=(4, 6), fontsize=7)
        ax.set_xscale("log", base=log_base)
        line = sorted(p for p in pts if p[2] not in side)
        if line:
            ax.plot([p[0] for p in line], [p[1] for p in line], color="tab:blue", alpha=0.6)
        ax.axhline(res["base"]["eval"][f"auc/{task}"], color="gray", linestyle="--", linewidth=1,
                   label="base student")
        ax.set(title=title, xlabel=xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"next-day AUC ({task}); Bayes {res['bayes'][f'auc/{task}']:.3f}")
    axes[0].legend(fontsize=8)
    fig.suptitle("Teacher scaling on the demo world (dots: seeds, line: seed mean)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_lr_selection(path: Path, sel: dict, binary: list[str]) -> Path:
    """Held-out AUC against the dense lr, one panel per task, one line per selection unit (dots: seeds); the chosen
    lr ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(binary), figsize=(5.5 * len(binary), 4), dpi=110, squeeze=False)
    for ax, t in zip(axes[0], binary, strict=True):
        for i, unit in enumerate(sel["units"]):
            color = f"C{i}"
            pts = [(r["lr"], r[f"val_auc/{t}"]) for r in sel["runs"] if r["unit"] == unit]
            ax.scatter(*zip(*pts, strict=True), color=color, s=16)
            means = [(lr, np.mean([a for x, a in pts if x == lr])) for lr in sel["grid"]]
            ax.plot(*zip(*means, strict=True), color=color, label=unit)
            best = sel["chosen"][unit]
            ax.scatter([best], [dict(means)[best]], s=140, facecolors="none", edgecolors=color, linewidths=1.5)
        ax.set_xscale("log")
        ax.set(title=f"held-out day(s) {sel['held_out_days']}: {t}", xlabel="dense lr (Adam)", ylabel="AUC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    unit = "variant family" if sel.get("per") == "variant" else "dense architecture"
    fig.suptitle(f"Dense lr per {unit}, chosen on held-out training data (ring: chosen on the mean over tasks)",
                 fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_capture(path: Path, res: dict) -> Path:
    """Per world component (x), the coefficient of each model's CTR logit on it (1 = follows that part of the
    truth fully, 0 = blind to it): where a scaling axis's AUC came from, or why it did not move."""
    from recdistill.report import plot_bars

    models = {"base (student)": res["base"]["capture_ctr"]} | {
        n: r["capture_ctr"] for n, r in res["variants"].items() if r.get("capture_ctr") and "_seed" not in n}
    # 'recent' is left out of the plot: its coefficient is unstable between runs (it is in the JSON)
    names = [k for k in next(iter(models.values())) if k not in ("r2", "recent")]
    return plot_bars(path, [k.replace("_", "\n") for k in names],
                     {m: [c.get(k, float("nan")) for k in names] for m, c in models.items()},
                     title="What each model learned of the world (CTR logit ~ true components)",
                     ylabel="coefficient (1 = fully followed)", ylim=(-0.3, 1.3), value_fmt="{:.2f}", figsize=(13, 4.5))
