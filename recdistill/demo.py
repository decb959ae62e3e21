"""`recdistill demo`: the main job, end to end, on the embedded default (what `make demo` runs).

    recdistill demo                                              # synthetic world, CPU, W&B offline
    recdistill demo --set data.samples_per_day=5000              # smaller
    recdistill demo --set data.source=parquet --set data.path=DIR   # your own data (DESIGN §4 layout)

What runs today: data generation (or reading), the teacher's and the student's sampled views with their
measured keep-rates and nesting check, the Bayes-optimal ceiling on synthetic data, a report (report.md, plots,
metrics.jsonl) and a W&B offline run. Teacher training, signal writing and student distillation are not part of
it yet (issues 4 and 5); the report says so and shows no distillation numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from recdistill.config import Config, add_config_arguments, config_from_args, save_config
from recdistill.data.loader import BatchLoader, DataSource, build_source, check_nested
from recdistill.data.sampling import SamplingConfig, keep_mask
from recdistill.distill import metrics
from recdistill.report import markdown_table, plot_lines, write_report
from recdistill.tracking import Tracker, console, progress

NOT_YET = ("teacher training + forward distillation (issue 4)", "student distillation and transferability (issue 5)")


@dataclass
class DayStats:
    """What one pass over one day collects."""

    rows: int = 0
    labels: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    p_true: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    hist_len: list[torch.Tensor] = field(default_factory=list)
    kept: dict[str, int] = field(default_factory=dict)
    not_nested: int = 0

    def cat(self, d: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: torch.cat(v) for k, v in d.items()}


def make_run_dir(cfg: Config) -> Path:
    """runs/<run_name or experiment-timestamp>/ (created)."""
    name = cfg.tracking.run_name or f"{cfg.experiment.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.tracking.run_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def usable_views(cfg: Config, src: DataSource) -> tuple[dict[str, SamplingConfig], list[str]]:
    """The configured views that can be applied to this source; reasons for the ones that cannot."""
    views, skipped = {}, []
    for name in ("teacher", "student"):
        view = getattr(cfg.sampling, name)
        try:
            check_nested(view, src.sampling, src.schema.num_traffic)
            views[name] = view
        except ValueError as exc:
            skipped.append(f"{name}: {exc}")
    return views, skipped


def scan_day(src: DataSource, day: int, cfg: Config, views: dict[str, SamplingConfig]) -> DayStats:
    """One pass over a day: labels, ground truth, history lengths, and each view's keep decisions."""
    st = DayStats()
    nt = src.schema.num_traffic
    for b in BatchLoader(src, [day], cfg.data.batch_size * 8, prefetch=cfg.data.prefetch):
        st.rows += len(b)
        for k, v in b.labels.items():
            st.labels.setdefault(k, []).append(v)
        for k, v in (b.p_true or {}).items():
            st.p_true.setdefault(k, []).append(v)
        st.hist_len.append(b.history.lengths)
        masks = {}
        for name, view in views.items():
            pos = b.labels[view.task].numpy() > 0.5
            masks[name] = keep_mask(b.sample_id.numpy(), pos, b.traffic.numpy(), view, nt)
            st.kept[name] = st.kept.get(name, 0) + int(masks[name].sum())
        if "teacher" in masks and "student" in masks:
            st.not_nested += int(np.sum(masks["student"] & ~masks["teacher"]))
    return st


def day_row(day: int, st: DayStats, kinds: dict[str, str], split: str) -> dict:
    """One row of the per-day table."""
    labels, p_true = st.cat(st.labels), st.cat(st.p_true)
    lengths = torch.cat(st.hist_len).float()
    row = {"day": day, "split": split, "rows": st.rows, "hist_mean": float(lengths.mean()),
           "hist_max": int(lengths.max())}
    for task, y in labels.items():
        row[f"{task}_mean"] = float(y.mean())
        if kinds[task] == "binary" and task in p_true:
            row[f"{task}_bayes_auc"] = metrics.auc(y, p_true[task])
    for name, kept in st.kept.items():
        row[f"kept_{name}"] = kept / max(st.rows, 1)
    row["student_not_in_teacher"] = st.not_nested
    return row


def run_demo(args) -> int:  # noqa: ANN001 - argparse.Namespace
    """Run the demo; returns the exit code."""
    cfg = config_from_args(args)
    run_dir = make_run_dir(cfg)
    save_config(cfg, run_dir)
    src = build_source(cfg.data)
    kinds = {t.name: t.kind for t in src.schema.tasks}
    days = src.days()
    eval_days = set(days[-cfg.data.eval_days:])
    views, skipped = usable_views(cfg, src)
    tracker = Tracker(cfg.tracking, run_dir, cfg.model_dump(mode="json"), name=run_dir.name)
    console(f"demo: run directory {run_dir}")
    console(f"demo: data source '{cfg.data.source}', days {days} (evaluation: {sorted(eval_days)}), tasks {kinds}")
    t0 = time.perf_counter()
    rows, eval_stats = [], None
    try:
        for day in progress(days, desc="days", enabled=cfg.tracking.progress):
            st = scan_day(src, day, cfg, views)
            split = "eval" if day in eval_days else "train"
            rows.append(day_row(day, st, kinds, split))
            tracker.log({f"data/{k}": v for k, v in rows[-1].items() if isinstance(v, (int, float))}, step=day)
            if day == max(eval_days):
                eval_stats = st
        secs = time.perf_counter() - t0
        total = sum(r["rows"] for r in rows)
        summary = {"data/rows": total, "data/seconds": secs, "throughput/samples_per_s": total / secs}
        if eval_stats is not None and eval_stats.p_true:
            truth = eval_stats.cat(eval_stats.p_true)
            ev = metrics.evaluate(eval_stats.cat(eval_stats.labels), truth, kinds, p_true=truth)
            summary.update({f"eval_ceiling/{k}": v for k, v in ev.items() if k.startswith("bayes_")})
        tracker.summary(summary)
        report = write_demo_report(run_dir, cfg, rows, summary, views, skipped)
    finally:
        tracker.finish()
    console(f"demo: scanned {total} samples in {secs:.1f} s ({total / secs:,.0f} samples/s)")
    console(f"demo: NOT run (not implemented yet): {'; '.join(NOT_YET)}. No distillation was performed.")
    console(f"demo: report {report}")
    console(f"demo: metrics {run_dir / 'metrics.jsonl'}; config {run_dir / 'config.yaml'}; W&B files under {run_dir}")
    return 0


def write_demo_report(run_dir: Path, cfg: Config, rows: list[dict], summary: dict,
                      views: dict[str, SamplingConfig], skipped: list[str]) -> Path:
    """report.md with the per-day table, the views, the ceiling, and plots."""
    binary = [k[: -len("_bayes_auc")] for k in rows[0] if k.endswith("_bayes_auc")]
    images = []
    if binary:
        images.append(plot_lines(
            run_dir / "bayes_auc_by_day.png", x=[r["day"] for r in rows],
            series={t: [r[f"{t}_bayes_auc"] for r in rows] for t in binary},
            title="Bayes-optimal AUC per day (ceiling for any model)", xlabel="day", ylabel="AUC"))
    rate_keys = [k for k in rows[0] if k.endswith("_mean") and k != "hist_mean"]
    images.append(plot_lines(run_dir / "label_rate_by_day.png", x=[r["day"] for r in rows],
                             series={k[:-5]: [r[k] for r in rows] for k in rate_keys},
                             title="Label mean per day", xlabel="day", ylabel="mean label"))
    view_lines = [f"- `{n}`: r={v.r}, q={v.q}, q_eff={v.q_eff}, b={v.b}, seed={v.seed}" for n, v in views.items()]
    view_lines += [f"- not applied: {s}" for s in skipped]
    nested = sum(r["student_not_in_teacher"] for r in rows)
    sections = [
        ("What ran", "Data generation/reading over every day, the sampled views, and the Bayes-optimal ceiling.\n\n"
                     "**Not run yet:** " + "; ".join(NOT_YET) + ". This report contains no distillation result."),
        ("Data per day", markdown_table(rows)),
        ("Sampled views", "\n".join(view_lines) + f"\n\nStudent samples missing from the teacher view: {nested}"
                                                  " (0 means the views nest)."),
        ("Summary", markdown_table([{"metric": k, "value": v} for k, v in summary.items()])),
    ]
    return write_report(run_dir, f"recdistill demo — {run_dir.name}", sections, images=images)


def register(sub) -> None:  # noqa: ANN001 - argparse subparsers
    """Add `recdistill demo`."""
    p = sub.add_parser("demo", help="run the main job end to end on the configured data (default: synthetic)")
    add_config_arguments(p)
    p.set_defaults(func=run_demo)
