"""Tables and plots of runs: markdown tables, small matplotlib figures, and report.md."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and clusters have no display
import matplotlib.pyplot as plt  # noqa: E402


def _fmt(v: object, floatfmt: str) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else format(v, floatfmt)
    return str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, floatfmt: str = ".4f") -> str:
    """A GitHub markdown table of `rows` (columns: given, or the union of keys in first-seen order)."""
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c), floatfmt) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_lines(path: str | Path, x: Sequence[float], series: dict[str, Sequence[float]], title: str = "",
               xlabel: str = "", ylabel: str = "", hlines: dict[str, float] | None = None) -> Path:
    """One line per series over `x` (plus labelled horizontal reference lines); saved as PNG at `path`."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for name, ys in series.items():
        ax.plot(list(x), list(ys), marker="o", label=name)
    for name, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", linewidth=1, color="gray")
        ax.annotate(name, (0.01, y), xycoords=("axes fraction", "data"), va="bottom", fontsize=8, color="gray")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_bars(path: str | Path, groups: Sequence[str], series: dict[str, Sequence[float]], title: str = "",
              ylabel: str = "", ref: dict[str, Sequence[float]] | None = None) -> Path:
    """Grouped bars: one group per entry of `groups`, one bar per series; `ref` draws per-group reference ticks
    (e.g. the Bayes-optimal AUC per task)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (name, ys) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, list(ys), width=width, label=name)
    for name, ys in (ref or {}).items():
        ax.scatter(range(len(groups)), list(ys), marker="_", s=900, color="black", label=name, zorder=3)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set(title=title, ylabel=ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(run_dir: str | Path, title: str, sections: Sequence[tuple[str, str]],
                 images: Sequence[str | Path] = ()) -> Path:
    """Write ``run_dir/report.md``: a title, one `## heading` per section, then the images (linked relative to
    the run directory). Returns the path."""
    run_dir = Path(run_dir)
    parts = [f"# {title}", ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body.strip(), ""]
    if images:
        parts += ["## Plots", ""]
        for img in images:
            resolved = Path(img).resolve()
            try:
                rel = resolved.relative_to(run_dir.resolve()).as_posix()
            except ValueError:  # outside the run directory: link by absolute path
                rel = resolved.as_posix()
            parts += [f"![{resolved.stem}]({rel})", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(parts))
    return out
