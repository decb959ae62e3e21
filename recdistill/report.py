"""Tables and plots of runs: markdown tables, small matplotlib figures (PNG), and ``run_dir/report.md``.

Typical use after an evaluation (`results` maps a model name to its :func:`recdistill.distill.metrics.evaluate`
output)::

    rows = metric_rows(results, "auc")                       # [{"model": "teacher", "ctr": 0.78, ...}, ...]
    png = plot_bars(run_dir / "auc.png", tasks, {r["model"]: [r[t] for t in tasks] for r in rows},
                    ref={"Bayes-optimal": [bayes[t] for t in tasks]}, ylabel="AUC")
    write_report(run_dir, "Distillation", [("AUC", markdown_table(rows))], images=[png])
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and clusters have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _fmt(v: object, floatfmt: str) -> str:
    """One table cell: floats with `floatfmt`, None empty, and '|' / newlines escaped so the row stays one row."""
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:  # torch / numpy 0-d values
        v = v.item()
    if v is None:
        return ""
    if isinstance(v, numbers.Real) and not isinstance(v, (bool, numbers.Integral)):
        v = float(v)
        return str(v) if not math.isfinite(v) else format(v, floatfmt)
    return str(v).replace("|", "\\|").replace("\n", "<br>")


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, floatfmt: str = ".4f") -> str:
    """A GitHub markdown table of `rows`: `columns` in the given order, or the union of the rows' keys in
    first-seen order; missing cells empty; floats formatted with `floatfmt` (nan / inf as such)."""
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(_fmt(c, floatfmt) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c), floatfmt) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def metric_rows(results: dict[str, dict[str, float]], metric: str, label: str = "model") -> list[dict]:
    """One row per entry of `results` (name -> flat metrics dict with keys ``metric/task``) holding that metric per
    task: ``metric_rows({"base": {"auc/ctr": 0.7, "ne/ctr": 0.9}}, "auc") == [{"model": "base", "ctr": 0.7}]``."""
    prefix = f"{metric}/"
    return [{label: name, **{k[len(prefix):]: v for k, v in m.items() if k.startswith(prefix)}}
            for name, m in results.items()]


def zoomed_ylim(values: Sequence[float]) -> tuple[float, float] | None:
    """A y range around the finite values with a margin, so differences of 0.01 AUC are visible on bars (the
    default axis from 0 would flatten them); None when there is nothing finite to show."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return None
    lo, hi = min(finite), max(finite)
    pad = max(0.15 * (hi - lo), 0.01 * max(abs(hi), 1e-12))
    return lo - pad, hi + pad


def plot_lines(path: str | Path, x: Sequence[float], series: dict[str, Sequence[float]], title: str = "",
               xlabel: str = "", ylabel: str = "", hlines: dict[str, float] | None = None,
               ylim: tuple[float, float] | None = None) -> Path:
    """One line per series over `x` (e.g. AUC per evaluation day per model), plus labelled dashed horizontal
    reference lines `hlines` (e.g. the Bayes-optimal AUC); saved as PNG at `path` (parents created). NaN points are
    gaps. Returns the path."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for name, ys in series.items():
        ax.plot(list(x), [float(v) for v in ys], marker="o", label=name)
    for name, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", linewidth=1, color="gray")
        ax.annotate(name, (0.01, y), xycoords=("axes fraction", "data"), va="bottom", fontsize=8, color="gray")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if all(float(v).is_integer() for v in x):  # days, steps: no 0.25 ticks
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_bars(path: str | Path, groups: Sequence[str], series: dict[str, Sequence[float]], title: str = "",
              ylabel: str = "", ref: dict[str, Sequence[float]] | None = None,
              ylim: tuple[float, float] | None = None, value_fmt: str = "{:.3f}",
              figsize: tuple[float, float] = (6.4, 4.0)) -> Path:
    """Grouped bars: one group per entry of `groups` (e.g. tasks), one bar per series (e.g. models), each labelled
    with its value; `ref` draws a black reference tick per group (e.g. the Bayes-optimal AUC per task). The y axis
    is zoomed onto the values unless `ylim` is given. Saved as PNG at `path`; returns the path."""
    fig, ax = plt.subplots(figsize=figsize, dpi=110)
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (name, ys) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, [float(v) for v in ys], width=width, label=name)
        ax.bar_label(bars, labels=[value_fmt.format(float(v)) for v in ys], fontsize=7, padding=1)
    for name, ys in (ref or {}).items():  # one dashed segment across each group's bars
        ax.hlines([float(v) for v in ys], [g - 0.45 for g in range(len(groups))],
                  [g + 0.45 for g in range(len(groups))], colors="black", linestyles="--", linewidth=1.5, label=name,
                  zorder=3)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set(title=title, ylabel=ylabel)
    limits = ylim or zoomed_ylim([v for ys in [*series.values(), *(ref or {}).values()] for v in ys])
    if limits is not None:
        ax.set_ylim(*limits)
    ax.grid(axis="y", alpha=0.3)
    if series or ref:
        ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)  # figures are kept alive by pyplot until closed: a long experiment would leak them
    return path


def write_report(run_dir: str | Path, title: str, sections: Sequence[tuple[str, str]],
                 images: Sequence[str | Path | tuple[str, str | Path]] = ()) -> Path:
    """Write ``run_dir/report.md``: `# title`, one `## heading` per (heading, markdown body) section, then a
    'Plots' section with the images (a path, or a (caption, path) pair; captioned by file stem otherwise), linked
    relative to the run directory so the folder can be moved or published as is. Returns the path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body.strip(), ""]
    if images:
        parts += ["## Plots", ""]
        for img in images:
            caption, img = img if isinstance(img, tuple) else (None, img)
            resolved = Path(img).resolve()
            try:
                link = resolved.relative_to(run_dir.resolve()).as_posix()
            except ValueError:  # outside the run directory: link by absolute path
                link = resolved.as_posix()
            parts += [f"![{caption or resolved.stem}]({link})", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(parts))
    return out
