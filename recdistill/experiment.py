"""One teacher, N students: the end-to-end job behind `recdistill demo` and `recdistill experiment`.

    recdistill demo                                            # configs/demo.yaml: teacher + base + distilled student
    recdistill experiment --config configs/experiments/ablations.yaml   # the ablation grid (towers, debias, beta)
    recdistill experiment --config configs/experiments/ablations.yaml \\
        --set experiment.teacher_signals=runs/demo-X/signals      # reuse a committed teacher run

Steps: save the resolved config into the run directory; train the teacher with torchrun (`experiment.teacher_procs`
gloo ranks on CPU, one NCCL rank per GPU on a GPU machine), which writes its raw logits into `<run>/signals`
during its own forward passes and its evaluation-day predictions into `<run>/teacher_eval.npz`; fit the simple
baselines of `experiment.baselines` (a logistic regression and LightGBM on engineered features, trained on the
teacher's rows: recdistill/baselines/) into `<run>/baselines`; train every student of `experiment.students` in this
process (one device) on the same data and signals; compare everyone on the identical, unsampled evaluation rows:
AUC / NE per task, the teacher's AUC over the best baseline's, teacher gain and student gain over the base
student, distillation transferability (AUC_student - AUC_base) / (AUC_teacher - AUC_base), the Bayes-optimal AUC
on synthetic data; write report.md, plots, metrics.jsonl and a W&B run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from recdistill.baselines import run_baselines
from recdistill.config import ROOT, Config, load_config, save_config
from recdistill.data.counts import CountedSource, cache_path
from recdistill.data.source import DataSource, build_source
from recdistill.distill import metrics
from recdistill.errors import RunError
from recdistill.report import markdown_table, plot_bars, write_report
from recdistill.runtime import usable_cores
from recdistill.tracking import Tracker, console
from recdistill.train.student import run_student

#: Report model names of the baselines start with this (baseline_lr, baseline_gbdt).
BASELINE_PREFIX = "baseline_"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def teacher_procs(cfg: Config) -> int:
    """Teacher ranks to launch: experiment.teacher_procs on CPU; on a GPU machine one per GPU, at most that many."""
    if torch.cuda.is_available():
        return max(1, min(cfg.experiment.teacher_procs, torch.cuda.device_count()))
    return cfg.experiment.teacher_procs


#: The project's own errors (recdistill/errors.py), as a rank's traceback names them on its last line.
_OWN_ERROR = re.compile(r"\b(?:recdistill\.[\w.]+\.)?(ConfigError|DataError|SignalError|RunError|UsageError): (.*)$")
#: Any other exception line; the launcher's own (ChildFailedError, SignalException) only repeat a rank's failure.
_ANY_ERROR = re.compile(r"^(?:\[rank\d+\]:\s*)?([A-Za-z_][\w.]*(?:Error|Exception)): (.*)$")
_LAUNCHER = ("torch.distributed.elastic", "ChildFailedError", "SignalException")
_ROOT_CAUSE = "Root Cause (first observed failure):"


def teacher_failure(log: list[str]) -> tuple[str, int]:
    """(one-line cause, exit status) of a failed teacher from its log: the first of the project's own errors that a
    rank raised (a ConfigError is status 2, the others 1), else the first other exception line that is not the
    launcher's, else ''."""
    for i, line in enumerate(log):
        m = _OWN_ERROR.search(line)
        if m:
            cause = m.group(2).strip()
            if cause.endswith(":") and i + 1 < len(log):  # "invalid config:" and its first indented line
                cause += " " + re.sub(r"^(\[rank\d+\]:)?\s*", "", log[i + 1])
            return cause, 2 if m.group(1) in ("ConfigError", "UsageError") else 1
    for line in log:
        m = _ANY_ERROR.match(line.strip())
        if m and not any(x in line for x in _LAUNCHER):
            return f"{m.group(1)}: {m.group(2).strip()}", 1
    # no exception line: a rank died of a signal; torchrun's summary names it
    text = "\n".join(log[log.index(_ROOT_CAUSE):]) if _ROOT_CAUSE in log else ""
    m = re.search(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)[^\n]*?(\(SIG\w+\))?\s*$", text, re.S | re.M)
    if m:
        return f"rank {m.group(1)} died with exit code {m.group(2)}{' ' + m.group(3) if m.group(3) else ''}", 1
    return "", 1


def _interrupted(code: int, log: list[str]) -> bool:
    """Whether the teacher stopped because it was interrupted (Ctrl-C reaches torchrun and its ranks too)."""
    return code in (-signal.SIGINT, 130, -signal.SIGTERM) or any(
        "KeyboardInterrupt" in ln or "Received 2 death signal" in ln or "Received Signals.SIGINT" in ln for ln in log)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the teacher's launcher and its ranks: SIGINT (what Ctrl-C sends; torchrun passes it on), then
    SIGTERM, then SIGKILL, each given a few seconds."""
    for send, wait in ((lambda: proc.send_signal(signal.SIGINT), 15), (proc.terminate, 10), (proc.kill, 10)):
        if proc.poll() is not None:
            return
        send()
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def _finished(run_dir: Path, nproc: int, since: float) -> bool:
    """Whether every rank wrote its summary and rank 0 its evaluation predictions after `since`: the teacher's
    work is done and committed (its ranks write the summary last, after the final signal window and the eval)."""
    done = [run_dir / f"teacher.rank{r}.json" for r in range(nproc)] + [run_dir / "teacher_eval.npz"]
    return all(p.exists() and p.stat().st_mtime >= since for p in done)


def run_ranks(module: str, args: list[str], nproc: int, log_path: Path, *, what: str, echo: tuple[str, ...],
              append: bool = False, finished: Callable[[float], bool] | None = None) -> None:
    """Run `python -m module args` on `nproc` ranks with torchrun. Every line the launcher and the ranks print goes
    to `log_path` (appended to with `append`); lines starting with one of `echo` are also echoed to the console,
    prefixed `[what]`. A failure raises a RunError naming `what` and the cause found in the log (the first config,
    data or signal error of a rank, not the launcher's ChildFailedError) and the log's path, unless
    `finished(start time)` says every rank had written its results (a crash at process teardown); an interrupt
    (Ctrl-C, in this process or in the ranks) stops every rank and raises KeyboardInterrupt."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
           "-m", module, *args]
    console(f"experiment: {what} on {nproc} rank(s), log {log_path}: {' '.join(cmd[2:])}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, usable_cores() // nproc)))}
    lines: list[str] = []
    started = time.time()
    with open(log_path, "a" if append else "w") as log, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        try:
            for line in proc.stdout:
                log.write(line)
                lines.append(line.rstrip())
                if line.startswith(echo):  # progress; the rest stays in the log
                    console(f"[{what}] " + line.rstrip()[:300])
            code = proc.wait()
        except KeyboardInterrupt:
            _stop(proc)
            raise
    if code != 0:
        if _interrupted(code, lines):
            raise KeyboardInterrupt
        if finished is not None and finished(started):
            console(f"experiment: the {what} exited with code {code} after every rank had written its results "
                    f"(a crash at process teardown): they are kept; details in {log_path}")
            return
        cause, status = teacher_failure(lines)
        err = RunError(f"{what} failed: {cause or f'exit code {code}'}", fix=f"full log: {log_path}")
        err.exit_code = status
        raise err


def run_teacher(cfg_path: Path, run_dir: Path, nproc: int, *, append: bool = False) -> dict:
    """Train the teacher with torchrun on `nproc` ranks (:func:`run_ranks`; log <run>/teacher.log, appended to with
    `append`, a resumed run; its progress lines echoed). Returns rank 0's summary."""
    run_ranks("recdistill.train.teacher",
              ["--config", str(cfg_path), "--set", f"signals.uri={run_dir / 'signals'}",
               "--set", f"teacher.checkpoint_dir={run_dir / 'teacher_ckpt'}", "--summary", str(run_dir / "teacher"),
               "--eval-out", str(run_dir / "teacher_eval.npz"), "--run-dir", str(run_dir / "teacher")],
              nproc, run_dir / "teacher.log", what="teacher", echo=("teacher step", "teacher: resum"), append=append,
              finished=lambda since: _finished(run_dir, nproc, since))
    return json.loads((run_dir / "teacher.rank0.json").read_text())


def load_preds(path: Path) -> dict[str, np.ndarray]:
    """An eval-predictions .npz (teacher --eval-out or student), rows sorted by sample_id."""
    with np.load(path) as f:
        d = {k: f[k] for k in f.files}
    order = np.argsort(d["sample_id"], kind="stable")
    return {k: v[order] for k, v in d.items()}


def score(preds: dict[str, np.ndarray], kinds: dict[str, str], ids: np.ndarray) -> dict[str, float]:
    """metrics.evaluate on the rows `ids` (which must all be present in `preds`)."""
    pos = np.searchsorted(preds["sample_id"], ids)
    if len(ids) and (pos.max() >= len(preds["sample_id"]) or not np.array_equal(preds["sample_id"][pos], ids)):
        raise ValueError("evaluation rows differ between models (they must all score the same unsampled days)")
    t = torch.from_numpy
    tasks = [k for k in kinds if f"pred_{k}" in preds]
    labels = {k: t(preds[f"label_{k}"][pos]) for k in tasks}
    p = {k: t(preds[f"pred_{k}"][pos].astype(np.float64)) for k in tasks}
    truth = {k: t(preds[f"p_true_{k}"][pos]) for k in tasks if f"p_true_{k}" in preds}
    return metrics.evaluate(labels, p, kinds, p_true=truth or None)


def model_rows(models: dict[str, dict[str, float]], kinds: dict[str, str]) -> list[dict]:
    """One AUC/NE row per model (name -> score() output) and binary task, and the Bayes-optimal row where the
    data has ground truth (the same for every model: they are scored on the same rows)."""
    binary = [k for k, v in kinds.items() if v == "binary"]
    rows = [{"model": m, **{f"auc/{t}": r.get(f"auc/{t}") for t in binary},
             **{f"ne/{t}": r.get(f"ne/{t}") for t in binary}} for m, r in models.items()]
    any_res = next(iter(models.values()), {})
    if any(f"bayes_auc/{t}" in any_res for t in binary):
        rows.append({"model": "Bayes-optimal (ceiling)",
                     **{f"auc/{t}": any_res.get(f"bayes_auc/{t}") for t in binary},
                     **{f"ne/{t}": any_res.get(f"bayes_ne/{t}") for t in binary}})
    return rows


def gain_bases(exp) -> dict[str, str]:  # noqa: ANN001 - ExperimentConfig
    """Student -> the student its gains are measured from: its own `base`, else experiment.base_student. A student
    that is some other student's `base` is a base itself and gets none."""
    named = {s.base for s in exp.students if s.base}
    return {s.name: s.base or exp.base_student for s in exp.students if s.name not in named}


def comparison(results: dict[str, dict[str, float]], teacher: dict[str, float] | None, bases: dict[str, str],
               kinds: dict[str, str], baselines: dict[str, dict[str, float]] | None = None,
               preds: dict[str, dict[str, np.ndarray]] | None = None, bootstrap: int = 0
               ) -> tuple[list[dict], list[dict]]:
    """(AUC/NE rows per model and task: teacher, students, baselines, Bayes-optimal; gain rows per student and
    task). `bases`: student -> the student its gains are measured from (`gain_bases`; students missing from it,
    and the bases themselves, have no gain row). `preds` (eval predictions per student, matched by sample_id) and
    `bootstrap` > 1 add `student_gain_se`, the paired bootstrap SE of the student's AUC minus its base's.
    Baselines get no gain rows: transferability is a student's measure."""
    binary = [k for k, v in kinds.items() if v == "binary"]
    auc_rows = model_rows(({"teacher": teacher} if teacher else {}) | results | (baselines or {}), kinds)
    gain_rows = []
    # one resampling of the evaluation rows for every pair (as paired_auc_se draws it), each base's resampled AUCs
    # computed once however many students it is the base of
    counts, base_aucs = None, {}
    if preds is not None and bootstrap > 1 and bases:
        counts = metrics.bootstrap_counts(len(next(iter(preds.values()))["sample_id"]), bootstrap)
    for name, r in results.items():
        b = bases.get(name)
        if b is None or name == b:
            continue
        cmp = metrics.compare(r, results[b], teacher)
        if counts is not None:  # the student's rows in its base's order (the same rows, matched by sample_id)
            order = np.argsort(preds[name]["sample_id"], kind="stable")
            pos = order[np.searchsorted(preds[name]["sample_id"][order], preds[b]["sample_id"])]
        for t in binary:
            row = {"student": name, "task": t, "base": b,
                   "teacher_gain": (teacher or {}).get(f"auc/{t}", float("nan")) - results[b][f"auc/{t}"],
                   "student_gain": cmp.get(f"auc_gain/{t}"),
                   "transferability": cmp.get(f"transferability/{t}", float("nan")),
                   "ne_rel_change": cmp.get(f"ne_rel_change/{t}")}
            if counts is not None:
                y = preds[b][f"label_{t}"]
                if (b, t) not in base_aucs:
                    base_aucs[b, t] = metrics.bootstrap_aucs(y, preds[b][f"pred_{t}"], counts)
                diff = metrics.bootstrap_aucs(y, preds[name][f"pred_{t}"][pos], counts) - base_aucs[b, t]
                row["student_gain_se"] = float(np.std(diff, ddof=1))
            gain_rows.append(row)
    return auc_rows, gain_rows


def teacher_vs_baselines(auc_rows: list[dict], kinds: dict[str, str]) -> list[str]:
    """One line per binary task: the teacher's AUC minus the best baseline's (empty without a teacher or a
    baseline)."""
    by = {r["model"]: r for r in auc_rows}
    base = [m for m in by if m.startswith(BASELINE_PREFIX)]
    if "teacher" not in by or not base:
        return []
    lines = []
    for t in (k for k, v in kinds.items() if v == "binary"):
        scored = [(by[m][f"auc/{t}"], m) for m in base if by[m].get(f"auc/{t}") is not None]
        if not scored or by["teacher"].get(f"auc/{t}") is None:
            continue
        best, name = max(scored)
        lines.append(f"- {t}: teacher vs best baseline: {by['teacher'][f'auc/{t}'] - best:+.4f} AUC "
                     f"(teacher {by['teacher'][f'auc/{t}']:.4f}, {name} {best:.4f})")
    return lines


def run_experiment(cfg: Config, run_dir: Path, tracker: Tracker, *, source: DataSource | None = None,
                   resume: bool = False) -> dict:
    """The whole job (see module docstring); returns {'auc_rows', 'gain_rows', 'teacher', 'students', 'baselines',
    'report', 'times'}.

    `source`: the opened data source (built from cfg.data when None). `resume`: `run_dir` holds an interrupted
    run of this config: a teacher that finished there is reused, an unfinished one continues from its newest
    checkpoint (<run>/teacher_ckpt; committed signal windows are kept), baselines whose predictions were written
    (<run>/baselines) are reused, the students train again."""
    if cfg.data.counts and cfg.data.count_cache is None:  # count once for the run: ranks, baselines, students
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"count_cache": str(run_dir / "count_tables")})})
        if isinstance(source, CountedSource):  # the caller's preflight source has counted them already
            source.save_cache(cache_path(cfg.data))
    cfg_path = save_config(cfg, run_dir)
    source = source if source is not None else build_source(cfg.data)
    kinds = {t.name: t.kind for t in source.schema.tasks}
    t0 = time.perf_counter()
    finished = resume and (run_dir / "teacher.rank0.json").exists() and (run_dir / "teacher_eval.npz").exists()
    if cfg.experiment.teacher_signals:
        signals = Path(cfg.experiment.teacher_signals)
        teacher_eval, teacher_sum = signals.parent / "teacher_eval.npz", {}
        console(f"experiment: reusing teacher signals {signals}")
    elif finished:
        signals, teacher_eval = run_dir / "signals", run_dir / "teacher_eval.npz"
        teacher_sum = json.loads((run_dir / "teacher.rank0.json").read_text())
        console(f"experiment: the teacher of {run_dir} had finished: reusing its signals and evaluation")
    else:
        teacher_sum = run_teacher(cfg_path, run_dir, teacher_procs(cfg), append=resume)
        signals, teacher_eval = run_dir / "signals", run_dir / "teacher_eval.npz"
        aucs = ", ".join(f"{k[len('eval/auc/'):]} {v:.4f}" for k, v in teacher_sum.items() if k.startswith("eval/auc/"))
        console(f"experiment: teacher done: {teacher_sum['steps']} steps per rank, {teacher_sum['seconds']:.0f} s; "
                f"next-day AUC {aucs}")
        tracker.log({f"teacher/{k}": v for k, v in teacher_sum.items() if isinstance(v, int | float)}, step=0)
    times = {"teacher_s": time.perf_counter() - t0}
    baseline_paths = {}
    if cfg.experiment.baselines:
        b0 = time.perf_counter()
        console(f"experiment: baselines {', '.join(cfg.experiment.baselines)} on the teacher's rows")
        baseline_paths = run_baselines(cfg, source, run_dir / "baselines", resume=resume)
        times["baselines_s"] = time.perf_counter() - b0
    students, preds = {}, {}
    for i, run in enumerate(cfg.experiment.students):
        scfg = load_config(cfg_path, run.set)
        extra = []
        if scfg.student.tower_loss != "task" and scfg.student.signals_uri is None:
            extra.append(f"student.signals_uri={signals}")
        if cfg.stream.days and scfg.student.checkpoint_dir is None:  # what `recdistill stream` starts from
            extra.append(f"student.checkpoint_dir={student_checkpoint_dir(run_dir, run.name)}")
        if extra:
            scfg = load_config(cfg_path, [*run.set, *extra])
        console(f"experiment: student {i + 1}/{len(cfg.experiment.students)} '{run.name}' "
                f"({scfg.student.towers}, tower_loss={scfg.student.tower_loss}, debias={scfg.student.debias}, "
                f"beta={scfg.student.beta})")
        s0 = time.perf_counter()
        students[run.name] = run_student(scfg, run_dir / "students", name=run.name, source=source, tracker=tracker)
        times[f"student_{run.name}_s"] = time.perf_counter() - s0
        preds[run.name] = load_preds(run_dir / "students" / f"{run.name}.eval_preds.npz")
    ids = preds[cfg.experiment.base_student]["sample_id"]
    results = {name: score(p, kinds, ids) for name, p in preds.items()}
    teacher = score(load_preds(teacher_eval), kinds, ids) if teacher_eval.exists() else None
    baselines = {name: score(load_preds(p), kinds, ids) for name, p in baseline_paths.items()}
    auc_rows, gain_rows = comparison(results, teacher, gain_bases(cfg.experiment), kinds, baselines, preds,
                                     cfg.experiment.bootstrap)
    summary = {f"{m}/{k}": v for m, r in ({"teacher": teacher or {}} | results | baselines).items()
               for k, v in r.items()}
    summary.update({f"{g['student']}/transferability/{g['task']}": g["transferability"] for g in gain_rows})
    summary.update({f"{g['student']}/student_gain_se/{g['task']}": g["student_gain_se"] for g in gain_rows
                    if "student_gain_se" in g})
    summary.update({f"time/{k}": v for k, v in times.items()})
    tracker.summary(summary)
    report = write_experiment_report(run_dir, cfg, auc_rows, gain_rows, teacher_sum, students, times, kinds,
                                     eval_rows=len(ids))
    tracker.save_file(report)
    return {"auc_rows": auc_rows, "gain_rows": gain_rows, "teacher": teacher_sum, "students": students,
            "baselines": baselines, "report": report, "times": times}


def write_experiment_report(run_dir: Path, cfg: Config, auc_rows: list[dict], gain_rows: list[dict],
                            teacher_sum: dict, students: dict[str, dict], times: dict, kinds: dict[str, str],
                            eval_rows: int) -> Path:
    """report.md with the comparison tables, signal counts, timings and two plots."""
    binary = [k for k, v in kinds.items() if v == "binary"]
    models = [r for r in auc_rows if not r["model"].startswith("Bayes")]
    bayes = next((r for r in auc_rows if r["model"].startswith("Bayes")), None)
    images = [plot_bars(run_dir / "auc_by_model.png", binary,
                        {r["model"]: [r[f"auc/{t}"] for t in binary] for r in models},
                        title="Next-day AUC on the unsampled evaluation rows", ylabel="AUC",
                        ref={"Bayes-optimal": [bayes[f"auc/{t}"] for t in binary]} if bayes else None)]
    if gain_rows:
        names = list(dict.fromkeys(g["student"] for g in gain_rows))
        tr = {(g["student"], g["task"]): g["transferability"] for g in gain_rows}
        finite = [v for v in tr.values() if v == v and abs(v) != float("inf")]
        images.append(plot_bars(run_dir / "transferability.png", binary,
                                {n: [tr[(n, t)] for t in binary] for n in names},
                                title="Distillation transferability (share of the teacher's AUC gain kept)",
                                ylabel="transferability",
                                ylim=(min([0.0, *finite]) - 0.05, max([1.0, *finite]) + 0.05)))
    sig_rows = [{"student": n, **{k[len("signals/"):]: v for k, v in s.items() if k.startswith("signals/")},
                 "train_samples": s.get("train/samples"), "samples_per_s": s.get("throughput/samples_per_s"),
                 "export": f"{s.get('export/format', '-')} (max diff {s.get('export/max_abs_diff', float('nan')):.1e})"}
                for n, s in students.items()]
    t_rows = [{"metric": k, "value": v} for k, v in teacher_sum.items()
              if k in ("steps", "trained_samples", "seconds", "samples_per_s", "signals/rows_written")]
    views = [f"- `{v.name}`: r={v.r}, q={v.q}, q_eff={v.q_eff}, b={v.b}" for v in (cfg.sampling.teacher,
                                                                                   cfg.sampling.student)]
    sections = [
        ("What ran", f"Teacher `{cfg.teacher.preset}` (history {cfg.teacher.history_len}) on {cfg.data.source} data, "
                     f"{cfg.data.num_days - cfg.data.eval_days} training day(s) of {cfg.data.samples_per_day:,} "
                     "samples "
                     f"before sampling; evaluation on the last {cfg.data.eval_days} day(s), unsampled, "
                     f"{eval_rows:,} rows, identical for every model. Students: "
                     + ", ".join(f"`{r.name}` ({' '.join(r.set) or 'defaults'})" for r in cfg.experiment.students)
                     + ". Baselines (on the teacher's rows): "
                     + (", ".join(f"`baseline_{b}`" for b in cfg.experiment.baselines) or "none")
                     + ".\n\nSampled views:\n" + "\n".join(views)),
        ("Next-day AUC / NE (main tower for students)", markdown_table(auc_rows)
         + ("\n\n" + "\n".join(vs) if (vs := teacher_vs_baselines(auc_rows, kinds)) else "")),
        ("Gains over the base student", markdown_table(gain_rows) if gain_rows else "(no distilled student)"),
        ("Teacher signals per student", markdown_table(sig_rows)),
        ("Teacher run", markdown_table(t_rows) if t_rows else "(reused signals)"),
        ("Time", markdown_table([{"part": k, "seconds": v} for k, v in times.items()], floatfmt=".1f")),
    ]
    return write_report(run_dir, f"recdistill {cfg.experiment.name} — {run_dir.name}", sections, images=images)


def student_checkpoint_dir(run_dir: Path, name: str) -> Path:
    """Where a run's student `name` keeps its checkpoints."""
    return run_dir / "students" / f"{name}.ckpt"


def default_config_path() -> Path | None:
    """configs/demo.yaml of this checkout (the embedded default of `recdistill demo`)."""
    p = ROOT / "configs" / "demo.yaml"
    return p if p.is_file() else None
