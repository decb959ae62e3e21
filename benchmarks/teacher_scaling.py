"""Teacher scaling on the synthetic world (issue 4): does the teacher beat the base model, and does each scaling
axis — (a) dense size, (b) history length, (c) data (higher negative keep-rate) — raise its next-day AUC?

    python benchmarks/teacher_scaling.py --from-head   # the full grid at demo size (~60 min on a shared 2-core box)
    python benchmarks/teacher_scaling.py --quick         # tiny smoke run (-quick result and plot: not committed)
    python benchmarks/teacher_scaling.py --only reference,history_short --set data.samples_per_day=30000
    python benchmarks/teacher_scaling.py --from-head --reuse --run-dir runs/X   # finish / re-score a grid in place

`--from-head` runs the committed code (a `git archive HEAD` plus this script), so the grid is consistent while
others edit a shared working tree.

Every model trains on configs/demo.yaml's world (8 days x 60K samples, 2000 users/items; days 0-6 train, day 7 is
scored unsampled) and is scored on the identical evaluation rows:

* `base`: the student architecture without distillation (`student.towers=single student.tower_loss=task`, the
  demo's student view and its last 2 training days) — the baseline of `recdistill demo`.
* `reference`: the demo teacher (preset 'small', history 1024, r=0.5), launched by `experiment.run_teacher`
  (torchrun, 2 gloo ranks, DMP + ZeRO-2), one pass over the 7 training days.
* (a) `dense_large`: a bigger TokenMixer-Large (d_model 128, 3 layers).
* (b) `history_short`: the reference with a 128-event history; "raising history" = reference minus this one.
* (c) `data_r1`: the reference keeping every negative (sampling.teacher r 0.5 -> 1.0, ~1.8x the samples/steps).
* `reference_seed1`: the reference with another initialisation seed — the run-to-run noise of a teacher AUC.
* `dense_large_lr`: (a) with the dense lr halved (0.003 -> 0.0015) for the doubled width.
* `dense_large_r1`: (a) again on data_r1's view, against data_r1: is the bigger dense part data-limited?

Noise is reported two ways: the paired bootstrap standard error of each AUC difference on the evaluation rows
(sampling noise of the evaluation day), and the reference's seed repeat (training noise, which includes the
former). An axis "raises AUC" when its gain exceeds 2x the larger of them.
Signals are not written (`teacher.write_signals=false`: this measures the teacher, not distillation) and only the
final checkpoint is taken. Result: results/teacher_scaling-<cpu>.json and a PNG beside it; the last stdout line
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS, cpu_name, write_result  # benchmarks/ is sys.path[0] when run as a script

from recdistill.config import load_config, save_config
from recdistill.data.loader import build_source
from recdistill.experiment import load_preds, run_teacher, score
from recdistill.models.teacher import TeacherDense
from recdistill.train.student import run_student

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["tracking.mode=disabled", "tracking.progress=false", "teacher.write_signals=false",
          "teacher.checkpoint_every=100000"]
BASE_STUDENT = ["student.towers=single", "student.tower_loss=task", "student.export=false"]
# name: (axis, overrides on top of the demo config). Order = priority: the grid can be cut short.
VARIANTS = {
    "reference": ("reference", []),
    "history_short": ("history", ["teacher.history_len=128"]),
    "dense_large": ("dense", ["teacher.d_model=128", "teacher.num_layers=3"]),
    "data_r1": ("data", ["sampling.teacher.name=teacher", "sampling.teacher.r=1.0", "sampling.teacher.q=1.0"]),
    "reference_seed1": ("noise", ["experiment.seed=1"]),
    # the dense axis with the dense learning rate halved for the doubled width (Adam: a wider layer moves its output
    # more per step at the same lr)
    "dense_large_lr": ("dense_lr", ["teacher.d_model=128", "teacher.num_layers=3", "teacher.lr=0.0015"]),
    # the dense axis again where data is less scarce: dense_large on data_r1's view, against data_r1
    "dense_large_r1": ("dense_at_r1", ["teacher.d_model=128", "teacher.num_layers=3", "sampling.teacher.name=teacher",
                                       "sampling.teacher.r=1.0", "sampling.teacher.q=1.0"]),
}
# axis: (scaled-up variant, not-scaled variant): its gain is AUC(scaled) - AUC(not scaled)
AXES = {"dense": ("dense_large", "reference"), "history": ("reference", "history_short"),
        "data": ("data_r1", "reference"), "dense_at_r1": ("dense_large_r1", "data_r1"),
        "dense_lr": ("dense_large_lr", "reference")}
QUICK = ["data.num_days=3", "data.samples_per_day=8192", "data.history_len=256", "teacher.history_len=256"]
QUICK_VARIANT = {"history_short": ["teacher.history_len=32"]}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
    import deepspeed
    import torchrec

    return {"python": platform.python_version(), "torch": torch.__version__, "torchrec": torchrec.__version__,
            "deepspeed": deepspeed.__version__, "numpy": np.__version__}


def git_rev() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def train_teacher(cfg_path: Path, run_dir: Path, nproc: int) -> tuple[dict, str | None]:
    """experiment.run_teacher, tolerating a crash at process teardown *after* rank 0 wrote its summary and the
    evaluation predictions (seen here: 'terminate called without an active exception' after 'teacher done')."""
    t0 = time.time()
    try:
        return run_teacher(cfg_path, run_dir, nproc), None
    except RuntimeError as exc:
        summ, ev = run_dir / "teacher.rank0.json", run_dir / "teacher_eval.npz"
        if summ.exists() and ev.exists() and min(summ.stat().st_mtime, ev.stat().st_mtime) >= t0:
            log(f"teacher exited non-zero after writing its summary and eval predictions: kept ({str(exc)[:120]})")
            return json.loads(summ.read_text()), "non-zero exit after the summary: " + str(exc).splitlines()[0]
        raise


def snapshot_and_reexec() -> None:
    """--from-head: run the committed code (a `git archive HEAD` in a temp dir, plus this script as it is), not a
    shared working tree that other people edit while the grid runs; outputs still go to this checkout."""
    import shutil
    import subprocess
    import tempfile

    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    snap = Path(tempfile.mkdtemp(prefix="teacher-scaling-code-"))
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(snap)], input=archive, check=True)
    shutil.copy2(Path(__file__).resolve(), snap / "benchmarks" / "teacher_scaling.py")
    argv = [a for a in sys.argv[1:] if a != "--from-head"]
    if "--run-dir" not in argv:
        argv += ["--run-dir", str(ROOT / "runs" / f"teacher_scaling-{time.strftime('%Y%m%d-%H%M%S')}")]
    if "--out" not in argv:
        quick = "--quick" in argv
        argv += ["--out", str(RESULTS / f"teacher_scaling-{result_name()}{'-quick' if quick else ''}.json")]
    env = {**os.environ, "PYTHONPATH": str(snap), "TEACHER_SCALING_CODE": f"git archive {rev.stdout.strip()}"}
    log(f"teacher_scaling: running the committed code {rev.stdout.strip()[:12]} from {snap}")
    os.chdir(snap)
    os.execve(sys.executable, [sys.executable, str(snap / "benchmarks" / "teacher_scaling.py"), *argv], env)


def result_name() -> str:
    return cpu_name().lower().replace("(r)", "").replace("(tm)", "").replace(" ", "-")[:40]


def dense_params(cfg, schema) -> dict[str, int]:  # noqa: ANN001
    """Parameter counts of the teacher's dense part (what DeepSpeed wraps), split by component."""
    dense = TeacherDense(schema, cfg.teacher)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"dense_params": count(dense), "longer_params": count(dense.longer), "mixer_params": count(dense.mixer)}


def auc_np(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC by ranks (predictions are continuous: ties are negligible)."""
    ranks = np.empty(len(s))
    ranks[np.argsort(s, kind="stable")] = np.arange(1, len(s) + 1)
    npos = y.sum()
    return float((ranks[y].sum() - npos * (npos + 1) / 2) / (npos * (len(y) - npos)))


def paired_bootstrap(y: np.ndarray, a: np.ndarray, b: np.ndarray, n: int, seed: int = 0) -> float:
    """Standard error of AUC(a) - AUC(b) on the same rows (rows resampled jointly)."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        diffs.append(auc_np(y[idx], a[idx]) - auc_np(y[idx], b[idx]))
    return float(np.std(diffs, ddof=1))


def hanley_mcneil(auc: float, npos: int, nneg: int) -> float:
    """Unpaired standard error of one AUC (Hanley & McNeil 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    return float(np.sqrt((auc * (1 - auc) + (npos - 1) * (q1 - auc**2) + (nneg - 1) * (q2 - auc**2)) / (npos * nneg)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny world and history: a smoke test of the whole grid")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every model (after the demo config)")
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all; base always runs)")
    p.add_argument("--nproc", type=int, default=2, help="teacher ranks (torchrun)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the paired AUC noise")
    p.add_argument("--run-dir", default=None, help="where the runs go (default runs/teacher_scaling-<time>)")
    p.add_argument("--out", default=None, help="result JSON path (default benchmarks/results/...)")
    p.add_argument("--reuse", action="store_true", help="in an existing --run-dir, keep every finished teacher "
                   "whose resolved config is unchanged (config.yaml is rewritten identically) and train the rest")
    p.add_argument("--from-head", action="store_true", help="run the committed code (git archive HEAD) rather "
                   "than the working tree, which others may be editing")
    args = p.parse_args()
    if args.from_head:
        snapshot_and_reexec()
    os.environ["WANDB_MODE"] = "disabled"
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(var, None)
    common = [*COMMON, *(QUICK if args.quick else []), *args.overrides]
    only = set(args.only.split(",")) if args.only else None
    variants = [(n, a, QUICK_VARIANT.get(n, o) if args.quick else o) for n, (a, o) in VARIANTS.items()
                if only is None or n in only or n == "reference"]  # every delta is relative to the reference
    root = Path(args.run_dir or ROOT / "runs" / f"teacher_scaling-{time.strftime('%Y%m%d-%H%M%S')}")
    root.mkdir(parents=True, exist_ok=True)
    log(f"teacher_scaling: runs under {root}; variants {[n for n, _, _ in variants]}; common overrides {common}")
    t_start = time.perf_counter()

    base_cfg = load_config(args.config, common)
    source = build_source(base_cfg.data)
    kinds = {t.name: t.kind for t in source.schema.tasks}
    binary = [k for k, v in kinds.items() if v == "binary"]

    # -- base student: the student architecture, task loss only ------------------------------------------------
    bcfg = load_config(args.config, [*common, *BASE_STUDENT])
    save_config(bcfg, root / "base")
    log("base student: training")
    t0 = time.perf_counter()
    base_sum = run_student(bcfg, root / "base", name="base", source=source)
    base_secs = time.perf_counter() - t0
    base_preds = load_preds(root / "base" / "base.eval_preds.npz")
    ids = base_preds["sample_id"]
    base_res = score(base_preds, kinds, ids)
    log(f"base student: {base_secs:.0f} s, " + ", ".join(f"auc/{t} {base_res[f'auc/{t}']:.4f}" for t in binary))

    # -- teachers ---------------------------------------------------------------------------------------------
    out_rows, preds = {}, {}
    for name, axis, over in variants:
        cfg = load_config(args.config, [*common, *over])
        run_dir = root / name
        before = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else None
        cfg_path = save_config(cfg, run_dir)
        same_cfg = before == cfg_path.read_text()
        shape = {k: getattr(cfg.teacher, k) for k in ("emb_dim", "num_tokens", "d_model", "ffn_mult", "num_layers",
                                                       "history_len", "merge_k", "longer_dim", "longer_layers",
                                                       "recent_k", "lr")}
        log(f"teacher {name} ({axis}): {over or 'demo config'}; r={cfg.sampling.teacher.r} q={cfg.sampling.teacher.q}")
        t0 = time.perf_counter()
        done = run_dir / "teacher.rank0.json"
        try:
            if args.reuse and done.exists() and (run_dir / "teacher_eval.npz").exists():
                log(f"teacher {name}: reusing {run_dir} (finished; config unchanged: {same_cfg})")
                summ, exit_note = json.loads(done.read_text()), "reused"
            else:
                summ, exit_note = train_teacher(cfg_path, run_dir, args.nproc)
        except RuntimeError as exc:
            log(f"teacher {name} failed: {exc}")
            out_rows[name] = {"axis": axis, "overrides": over, "error": str(exc)[-2000:]}
            continue
        wall = time.perf_counter() - t0
        preds[name] = load_preds(run_dir / "teacher_eval.npz")
        res = score(preds[name], kinds, ids)
        out_rows[name] = {
            "axis": axis, "overrides": over, "shape": shape, "sampling_teacher": cfg.sampling.teacher.model_dump(),
            **dense_params(cfg, source.schema),
            "steps": summ["steps"], "trained_samples": summ["trained_samples"], "train_seconds": summ["seconds"],
            "samples_per_s": summ["samples_per_s"], "wall_seconds": wall, "final_loss": summ["loss"],
            "trained_samples_all_ranks": sum(json.loads(f.read_text())["trained_samples"]
                                             for f in run_dir.glob("teacher.rank*.json")),
            "exit_note": exit_note,
            "stream": {k[len("stream/"):]: v for k, v in summ.items() if k.startswith("stream/")},
            "eval": {k: v for k, v in res.items() if k.split("/")[0] in ("auc", "ne", "bayes_auc", "bayes_ne")},
        }
        log(f"teacher {name}: {summ['steps']} steps, {summ['trained_samples']} samples, {wall:.0f} s; "
            + ", ".join(f"auc/{t} {res[f'auc/{t}']:.4f}" for t in binary)
            + f"; elapsed {time.perf_counter() - t_start:.0f} s")
        # a partial result after every teacher: the grid may be cut short
        res_json = summarise(args, root, common, base_sum, base_res, base_secs, out_rows, preds, ids, binary,
                             base_preds, t_start, partial=True)
        write_result("teacher_scaling", res_json, args.quick, args.out)

    res_json = summarise(args, root, common, base_sum, base_res, base_secs, out_rows, preds, ids, binary, base_preds,
                         t_start, partial=False)
    path = write_result("teacher_scaling", res_json, args.quick, args.out)
    png = plot(path.with_suffix(".png"), res_json, binary)
    log(f"teacher_scaling: {path}, {png}; {time.perf_counter() - t_start:.0f} s")
    print(json.dumps({"result": str(path), "plot": str(png), "checks": res_json["checks"],
                      "auc": {n: r.get("eval", {}).get(f"auc/{binary[0]}") for n, r in res_json["variants"].items()},
                      "base_auc": base_res[f"auc/{binary[0]}"], "bayes_auc": res_json["bayes"][f"auc/{binary[0]}"]}))


def summarise(args, root, common, base_sum, base_res, base_secs, rows, preds, ids, binary, base_preds,  # noqa: ANN001
              t_start, partial: bool) -> dict:
    """The result document: variants, deltas per axis against the reference, noise, checks."""
    ref = preds.get("reference")
    y = {t: base_preds[f"label_{t}"].astype(bool) for t in binary}
    npos = {t: int(y[t].sum()) for t in binary}
    noise: dict = {"eval_rows": len(ids), "positives": npos,
                   "hanley_mcneil_se": {t: hanley_mcneil(base_res[f"auc/{t}"], npos[t], len(ids) - npos[t])
                                        for t in binary}}
    deltas: dict = {}
    pos = {n: np.searchsorted(p["sample_id"], ids) for n, p in preds.items()}
    nb = 40 if args.quick else args.bootstrap

    def compare(x: str, z: str) -> dict:
        out = {}
        for t in binary:
            out[f"auc_delta/{t}"] = rows[x]["eval"][f"auc/{t}"] - rows[z]["eval"][f"auc/{t}"]
            out[f"paired_se/{t}"] = paired_bootstrap(y[t], preds[x][f"pred_{t}"][pos[x]],
                                                     preds[z][f"pred_{t}"][pos[z]], nb)
        return out

    if ref is not None:
        for name in preds:
            if name != "reference":
                deltas[name] = {"axis": rows[name]["axis"], **compare(name, "reference")}
    seed = deltas.get("reference_seed1", {})
    if seed:
        noise["seed_repeat_auc_delta"] = {t: seed[f"auc_delta/{t}"] for t in binary}
    axes = {}
    for axis, (up, down) in AXES.items():
        if up not in preds or down not in preds:
            continue
        c = compare(up, down)
        a = axes[axis] = {"scaled_minus_unscaled": f"{up} - {down}",
                          **{f"auc_gain/{t}": c[f"auc_delta/{t}"] for t in binary},
                          **{f"paired_se/{t}": c[f"paired_se/{t}"] for t in binary}}
        for t in binary:
            thr = 2 * max(c[f"paired_se/{t}"], abs(seed.get(f"auc_delta/{t}", 0.0)))
            a[f"threshold/{t}"] = thr
            a[f"raises/{t}"] = bool(a[f"auc_gain/{t}"] > thr)
    checks = {}
    if "reference" in rows and "eval" in rows["reference"]:
        checks["teacher_beats_base"] = {t: rows["reference"]["eval"][f"auc/{t}"] - base_res[f"auc/{t}"]
                                        for t in binary}
    for ax, a in axes.items():
        checks[f"{ax}_raises"] = {t: a[f"raises/{t}"] for t in binary}
    return {
        "bench": "teacher_scaling", "partial": partial, "quick": args.quick, "device": cpu_name(),
        "cpu_count": os.cpu_count(), "versions": versions(),
        "code": os.environ.get("TEACHER_SCALING_CODE", f"working tree at {git_rev()}"),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_seconds": time.perf_counter() - t_start,
        "command": " ".join(["python", "benchmarks/teacher_scaling.py", *sys.argv[1:]]),
        "config": str(Path(args.config).relative_to(ROOT)) if Path(args.config).is_relative_to(ROOT) else args.config,
        "common_overrides": common, "teacher_ranks": args.nproc, "run_dir": str(root),
        "world": {"num_days": base_cfg_val(args, common, "num_days"),
                  "samples_per_day": base_cfg_val(args, common, "samples_per_day"),
                  "data_history_len": base_cfg_val(args, common, "history_len")},
        "bayes": {f"auc/{t}": base_res[f"bayes_auc/{t}"] for t in binary}
        | {f"ne/{t}": base_res[f"bayes_ne/{t}"] for t in binary},
        "base": {"overrides": BASE_STUDENT, "seconds": base_secs,
                 "train_samples": base_sum.get("train/samples"),
                 "eval": {k: v for k, v in base_res.items() if k.split("/")[0] in ("auc", "ne")}},
        "variants": rows, "deltas_vs_reference": deltas, "axes": axes, "noise": noise, "checks": checks,
    }


def base_cfg_val(args, common, key: str):  # noqa: ANN001, ANN201
    return getattr(load_config(args.config, common).data, key)


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


if __name__ == "__main__":
    RESULTS.mkdir(parents=True, exist_ok=True)
    main()
