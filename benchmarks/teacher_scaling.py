"""Teacher scaling on the synthetic world (issue 4): does the teacher beat the base model, and does each scaling
axis — (a) dense size, (b) history length, (c) data (higher negative keep-rate) — raise its next-day AUC?

    python benchmarks/teacher_scaling.py --from-head   # the full grid at demo size, lr selection first (~3 h, 2 cores)
    python benchmarks/teacher_scaling.py --quick         # tiny smoke run (-quick result and plot: not committed)
    python benchmarks/teacher_scaling.py --only reference,history_short --set data.samples_per_day=30000
    python benchmarks/teacher_scaling.py --from-head --reuse --run-dir runs/X   # finish / re-score a grid in place
    python benchmarks/teacher_scaling.py --from-head --select-only --run-dir runs/X   # the lr selection alone

`--from-head` runs the committed code (a `git archive HEAD` plus this script), so the grid is consistent while
others edit a shared working tree.

Every model trains on configs/demo.yaml's world (8 days x 60K samples, 2000 users/items, the interaction cell as
pairwise crosses at strength 1.5; days 0-6 train, day 7 is scored unsampled) and is scored on the identical
evaluation rows:

* `base`: the student architecture without distillation (`student.towers=single student.tower_loss=task`, the
  demo's student view and its last 2 training days) — the baseline of `recdistill demo`.
* `reference`: the demo teacher (preset 'small', history 1024, r=0.5, batch 128 per rank), launched by
  `experiment.run_teacher` (torchrun, 2 gloo ranks, DMP + ZeRO-2), one pass over the 7 training days.
* (a) dense size: `dense_small` (TokenMixer d_model 32, 1 layer), `dense_large` (d_model 128, 3 layers),
  `dense_longer` (LONGER width 64, 4 heads).
* Dense learning rate: chosen per variant family (a variant and its seed repeats) among `--lr-grid` (default 1e-3,
  3e-3) on held-out training data before any variant trains (select_lr: train on days 0-5, score day 6
  unsampled, `--select-seeds` seeds each); every variant then trains at its family's chosen lr. The best Adam lr
  falls with width and rises as the steps get fewer, so one lr for every model would measure the lr, not the
  axis. `--lr-per arch` chooses per dense architecture instead (history and data variants take the
  reference's); `--lr-grid ''` gives the config's lr to every model (the old behaviour).
* (b) `history_short`: the reference with a 128-event history; "raising history" = reference minus this one.
* (c) data: the negative keep-rate of the teacher's view, `data_r01` (r=0.1), `data_r025`, reference (0.5),
  `data_r1` (every negative; ~1.8x the samples of the reference). Every positive is kept in all of them.
* `<variant>_seed1`: the variant with experiment.seed=1 (training noise).

Noise is reported two ways: the paired bootstrap standard error of each AUC difference on the evaluation rows
(sampling noise of the evaluation day), and training noise: a variant X may have seed repeats X_seed1, ...
(another experiment.seed); the run-to-run sd of a teacher AUC is pooled over every such pair, and an axis's
gain is the difference of its seed means. An axis "raises AUC" when that gain exceeds 2x the larger of the
paired bootstrap SE and the training-noise SE of the difference (run_sd * sqrt(1/n_scaled + 1/n_unscaled)).

Each model's CTR predictions are also regressed on the world's true logit components (`capture_ctr`;
recdistill.distill.metrics.component_capture; PNG '-capture'): which part of the world an axis bought.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS, cpu_name, write_result  # benchmarks/ is sys.path[0] when run as a script
from teacher_scaling_plots import plot_all, plot_lr_selection, seed_runs

from recdistill.config import load_config, save_config
from recdistill.data.source import build_source, stored_source
from recdistill.data.world import SyntheticWorld
from recdistill.distill.metrics import auc, auc_standard_error, component_capture
from recdistill.experiment import load_preds, run_teacher, score
from recdistill.models.teacher import TeacherDense
from recdistill.train.student import run_student

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["tracking.mode=disabled", "tracking.progress=false", "teacher.write_signals=false",
          "teacher.checkpoint_every=100000"]
BASE_STUDENT = ["student.towers=single", "student.tower_loss=task", "student.export=false"]


def _view(r: float) -> list[str]:
    """The teacher's view with negative keep-rate r (every positive kept)."""
    return ["sampling.teacher.name=teacher", f"sampling.teacher.r={r}", "sampling.teacher.q=1.0"]


# name: (axis, overrides on top of the demo config). Order = priority: the grid can be cut short.
VARIANTS = {
    "reference": ("reference", []),
    "history_short": ("history", ["teacher.history_len=128"]),
    "dense_large": ("dense", ["teacher.d_model=128", "teacher.num_layers=3"]),
    "data_r1": ("data", _view(1.0)),
    "reference_seed1": ("noise", ["experiment.seed=1"]),
    "dense_longer": ("dense_longer", ["teacher.longer_dim=64", "teacher.longer_heads=4"]),
    "dense_small": ("dense_small", ["teacher.d_model=32", "teacher.num_layers=1"]),
    "data_r025": ("data_small", _view(0.25)),
    "data_r01": ("data_small", _view(0.1)),
}
# Seed repeats X_seedK: X with experiment.seed=K (training noise of each axis's end points; see seed_runs / run_sd in
# summarise). A third seed at the dense end points: that axis's gain is small next to run-to-run noise (docs/LOG.md).
for _name, _k in (("dense_small", 1), ("data_r01", 1), ("data_r025", 1), ("dense_large", 1), ("data_r1", 1),
                  ("dense_small", 2), ("dense_large", 2)):
    VARIANTS[f"{_name}_seed{_k}"] = (VARIANTS[_name][0], [*VARIANTS[_name][1], f"experiment.seed={_k}"])
# axis: (scaled-up variant, not-scaled variant): its gain is AUC(scaled) - AUC(not scaled)
AXES = {"dense_small_to_reference": ("reference", "dense_small"), "dense": ("dense_large", "reference"),
        "dense_small_to_large": ("dense_large", "dense_small"),
        "dense_longer": ("dense_longer", "reference"), "history": ("reference", "history_short"),
        "data_r01_to_r1": ("data_r1", "data_r01"), "data_r01_to_r05": ("reference", "data_r01"),
        "data_r025_to_r05": ("reference", "data_r025"),
        "data": ("data_r1", "reference")}
# The dense learning rate is chosen on held-out training data (select_lr) per variant family (a variant and its seed
# repeats), or with --lr-per arch per dense architecture (these keys). The grid is the earlier sweeps' (docs/LOG.md).
ARCH_KEYS = ("teacher.d_model", "teacher.num_layers", "teacher.longer_dim", "teacher.longer_heads")
LR_GRID = "0.001,0.003"
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
    """--from-head: run the committed code (a `git archive HEAD` in a temp dir, plus this bench as it is), not a
    shared working tree that other people edit while the grid runs; outputs still go to this checkout."""
    import shutil
    import subprocess
    import tempfile

    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    snap = Path(tempfile.mkdtemp(prefix="teacher-scaling-code-"))
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(snap)], input=archive, check=True)
    for script in ("teacher_scaling.py", "teacher_scaling_plots.py"):
        shutil.copy2(Path(__file__).resolve().with_name(script), snap / "benchmarks" / script)
    argv = [a for a in sys.argv[1:] if a != "--from-head"]
    for i, a in enumerate(argv[:-1]):  # paths given relative to the caller's cwd, which is about to change
        if a in ("--run-dir", "--out", "--config"):
            argv[i + 1] = str(Path(argv[i + 1]).resolve())
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


def paired_bootstrap(y: np.ndarray, a: np.ndarray, b: np.ndarray, n: int, seed: int = 0) -> float:
    """Standard error of AUC(a) - AUC(b) on the same rows (rows resampled jointly)."""
    rng = np.random.default_rng(seed)
    yt, at, bt = (torch.from_numpy(v) for v in (y, a, b))
    diffs = []
    for _ in range(n):
        idx = torch.from_numpy(rng.integers(0, len(y), len(y)))
        diffs.append(auc(yt[idx], at[idx]) - auc(yt[idx], bt[idx]))
    return float(np.std(diffs, ddof=1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny world and history: a smoke test of the whole grid")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every model (after the demo config)")
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all; base always runs)")
    p.add_argument("--no-reference", action="store_true", help="do not add the reference to --only (deltas and "
                   "axes against it are then left out)")
    p.add_argument("--nproc", type=int, default=2, help="teacher ranks (torchrun)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the paired AUC noise")
    p.add_argument("--run-dir", default=None, help="where the runs go (default runs/teacher_scaling-<time>)")
    p.add_argument("--out", default=None, help="result JSON path (default benchmarks/results/...)")
    p.add_argument("--reuse", action="store_true", help="in an existing --run-dir, keep every finished teacher "
                   "whose resolved config is unchanged (config.yaml is rewritten identically) and train the rest")
    p.add_argument("--from-head", action="store_true", help="run the committed code (git archive HEAD) rather "
                   "than the working tree, which others may be editing")
    p.add_argument("--lr-grid", default=LR_GRID, help="dense learning rates to choose from, per --lr-per unit, "
                   "on held-out training data (comma-separated; '' = the config's lr for every model, no selection)")
    p.add_argument("--lr-per", choices=("variant", "arch"), default="variant", help="choose the lr per variant "
                   "family (its overrides but the seed: the best lr moves with the data size as well as the width) "
                   "or per dense architecture (history and data variants then take the reference's)")
    p.add_argument("--select-seeds", type=int, default=2, help="seeds per (unit, lr) in the lr selection")
    p.add_argument("--select-only", action="store_true", help="stop after the lr selection (its result JSON has "
                   "'lr_selection' and no variants); a later --reuse run in the same --run-dir picks it up")
    return p.parse_args(argv)


@dataclass
class Plan:
    """What the grid will run: its directory, the overrides every model gets, and the teacher variants as
    (name, axis, overrides); `t_start` times the whole grid."""

    root: Path
    common: list[str]
    variants: list[tuple[str, str, list[str]]]
    t_start: float


@dataclass
class Base:
    """The base student's run and the evaluation rows every model is scored on."""

    source: object  # the DataSource of the world (its schema and, for the synthetic world, its components)
    kinds: dict[str, str]
    binary: list[str]
    summary: dict
    res: dict
    seconds: float
    preds: dict[str, np.ndarray]
    ids: np.ndarray
    comps: dict[str, np.ndarray] | None
    capture: dict | None


def plan_variants(args: argparse.Namespace) -> Plan:
    """The variants to train (--only, --quick), the common overrides, the run directory; logs the plan."""
    common = [*COMMON, *(QUICK if args.quick else []), *args.overrides]
    only = set(args.only.split(",")) if args.only else None
    variants = [(n, a, QUICK_VARIANT.get(n, o) if args.quick else o) for n, (a, o) in VARIANTS.items()
                if only is None or n in only or (n == "reference" and not args.no_reference)]  # deltas are vs it
    root = Path(args.run_dir or ROOT / "runs" / f"teacher_scaling-{time.strftime('%Y%m%d-%H%M%S')}")
    root.mkdir(parents=True, exist_ok=True)
    log(f"teacher_scaling: runs under {root}; variants {[n for n, _, _ in variants]}; common overrides {common}")
    return Plan(root, common, variants, time.perf_counter())


def train_base(args: argparse.Namespace, plan: Plan) -> Base:
    """The base student (the student architecture, task loss only): the baseline, and the evaluation rows."""
    base_cfg = load_config(args.config, plan.common)
    source = build_source(base_cfg.data)
    kinds = {t.name: t.kind for t in source.schema.tasks}
    binary = [k for k, v in kinds.items() if v == "binary"]
    bcfg = load_config(args.config, [*plan.common, *BASE_STUDENT])
    save_config(bcfg, plan.root / "base")
    log("base student: training")
    t0 = time.perf_counter()
    summary = run_student(bcfg, plan.root / "base", name="base", source=source)
    seconds = time.perf_counter() - t0
    preds = load_preds(plan.root / "base" / "base.eval_preds.npz")
    ids = preds["sample_id"]
    res = score(preds, kinds, ids)
    comps = eval_components(source, ids)
    log(f"base student: {seconds:.0f} s, " + ", ".join(f"auc/{t} {res[f'auc/{t}']:.4f}" for t in binary))
    return Base(source, kinds, binary, summary, res, seconds, preds, ids, comps, capture(preds, ids, comps))


def choose_lr(args: argparse.Namespace, plan: Plan, base: Base) -> dict | None:
    """Select the dense lr per --lr-per unit on held-out training data (never the evaluation day) and give every
    variant its unit's lr (plan.variants is updated); None without --lr-grid."""
    grid = [float(v) for v in args.lr_grid.split(",") if v.strip()]
    selection = select_lr(args, plan.root, plan.common, plan.variants, grid, base.kinds, base.binary) if grid else None
    if selection:
        plan.variants = [(n, a, [*o, f"teacher.lr={selection['chosen'][unit_name(o, plan.variants, args.lr_per)]}"])
                         for n, a, o in plan.variants]
    return selection


def write_selection(args: argparse.Namespace, plan: Plan, base: Base, selection: dict | None) -> None:
    """--select-only: the lr selection's result document and plot, and the final JSON line."""
    path = write_result("teacher_scaling", {**provenance(args, plan.root, plan.common), "select_only": True,
                                            "lr_selection": selection}, args.quick, args.out)
    if selection:
        plot_lr_selection(path.with_name(path.stem + "-lr.png"), selection, base.binary)
    log(f"teacher_scaling: lr selection only: {path}")
    print(json.dumps({"result": str(path), "chosen": selection and selection["chosen"]}))


def train_variant(args: argparse.Namespace, plan: Plan, base: Base, name: str, axis: str,
                  over: list[str]) -> tuple[dict, dict | None]:
    """Train (or, with --reuse, keep) one teacher variant and score it: (its result row, its eval predictions or
    None when it failed)."""
    cfg = load_config(args.config, [*plan.common, *over])
    run_dir = plan.root / name
    cfg_path, reusable = prepare_run(cfg, run_dir, args.reuse)
    shape = {k: getattr(cfg.teacher, k) for k in ("emb_dim", "num_tokens", "d_model", "ffn_mult", "num_layers",
                                                   "history_len", "merge_k", "longer_dim", "longer_layers",
                                                   "recent_k", "lr")}
    log(f"teacher {name} ({axis}): {over or 'demo config'}; r={cfg.sampling.teacher.r} q={cfg.sampling.teacher.q}")
    t0 = time.perf_counter()
    try:
        if reusable:
            log(f"teacher {name}: reusing {run_dir} (finished, same resolved config)")
            summ, exit_note = json.loads((run_dir / "teacher.rank0.json").read_text()), "reused"
        else:
            summ, exit_note = train_teacher(cfg_path, run_dir, args.nproc)
    except RuntimeError as exc:
        log(f"teacher {name} failed: {exc}")
        return {"axis": axis, "overrides": over, "error": str(exc)[-2000:]}, None
    wall = time.perf_counter() - t0
    preds = load_preds(run_dir / "teacher_eval.npz")
    res = score(preds, base.kinds, base.ids)
    row = {
        "axis": axis, "overrides": over, "shape": shape, "sampling_teacher": cfg.sampling.teacher.model_dump(),
        **dense_params(cfg, base.source.schema),
        "steps": summ["steps"], "trained_samples": summ["trained_samples"], "train_seconds": summ["seconds"],
        "samples_per_s": summ["samples_per_s"], "wall_seconds": wall, "final_loss": summ["loss"],
        "trained_samples_all_ranks": sum(json.loads(f.read_text())["trained_samples"]
                                         for f in run_dir.glob("teacher.rank*.json")),
        "exit_note": exit_note,
        "stream": {k[len("stream/"):]: v for k, v in summ.items() if k.startswith("stream/")},
        "eval": {k: v for k, v in res.items() if k.split("/")[0] in ("auc", "ne", "bayes_auc", "bayes_ne")},
        "capture_ctr": capture(preds, base.ids, base.comps),
    }
    log(f"teacher {name}: {summ['steps']} steps, {summ['trained_samples']} samples, {wall:.0f} s; "
        + ", ".join(f"auc/{t} {res[f'auc/{t}']:.4f}" for t in base.binary)
        + f"; elapsed {time.perf_counter() - plan.t_start:.0f} s")
    return row, preds


def train_variants(args: argparse.Namespace, plan: Plan, base: Base, selection: dict | None) -> tuple[dict, dict]:
    """Every planned teacher in order, a partial result written after each (the grid may be cut short):
    (rows by variant, eval predictions by variant that finished)."""
    rows, preds = {}, {}
    for name, axis, over in plan.variants:
        rows[name], p = train_variant(args, plan, base, name, axis, over)
        if p is None:
            continue
        preds[name] = p
        res_json = summarise(args, plan, base, rows, preds, partial=True, lr_selection=selection)
        write_result("teacher_scaling", res_json, args.quick, args.out)
    return rows, preds


def report(args: argparse.Namespace, plan: Plan, base: Base, rows: dict, preds: dict, selection: dict | None) -> None:
    """The final result document (with the bootstrap), its plots, and the one-JSON-object last line."""
    res_json = summarise(args, plan, base, rows, preds, partial=False, lr_selection=selection)
    path = write_result("teacher_scaling", res_json, args.quick, args.out)
    png = plot_all(path, res_json, base.binary, selection)
    log(f"teacher_scaling: {path}, {png}; {time.perf_counter() - plan.t_start:.0f} s")
    first = base.binary[0]
    print(json.dumps({"result": str(path), "plot": str(png), "checks": res_json["checks"],
                      "auc": {n: r.get("eval", {}).get(f"auc/{first}") for n, r in res_json["variants"].items()},
                      "base_auc": base.res[f"auc/{first}"], "bayes_auc": res_json["bayes"][f"auc/{first}"]}))


def main(argv: list[str] | None = None) -> None:
    """Plan the variants, train the base student, select the lr, train the teachers, summarise and plot."""
    args = parse_args(argv)
    if args.from_head:
        snapshot_and_reexec()
    os.environ["WANDB_MODE"] = "disabled"
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(var, None)
    plan = plan_variants(args)
    base = train_base(args, plan)
    selection = choose_lr(args, plan, base)
    if args.select_only:
        write_selection(args, plan, base, selection)
        return
    rows, preds = train_variants(args, plan, base, selection)
    report(args, plan, base, rows, preds, selection)


def prepare_run(cfg, run_dir: Path, reuse: bool) -> tuple[Path, bool]:  # noqa: ANN001 - a Config
    """Write run_dir/config.yaml; returns its path and whether the finished teacher already there can be kept:
    --reuse and the same resolved config as the one it was trained with."""
    old = run_dir / "config.yaml"
    before = old.read_text() if old.exists() else None
    cfg_path = save_config(cfg, run_dir)
    finished = (run_dir / "teacher.rank0.json").exists() and (run_dir / "teacher_eval.npz").exists()
    same = before == cfg_path.read_text()
    if reuse and finished and not same:
        log(f"{run_dir} was trained with another config: training again")
    return cfg_path, reuse and finished and same


def provenance(args, root: Path, common: list[str]) -> dict:  # noqa: ANN001 - argparse.Namespace
    """What ran, where and on what: the head of every result document (grid or --select-only)."""
    cfg = Path(args.config)
    return {"bench": "teacher_scaling", "quick": args.quick, "device": cpu_name(), "cpu_count": os.cpu_count(),
            "versions": versions(), "code": os.environ.get("TEACHER_SCALING_CODE", f"working tree at {git_rev()}"),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(["python", "benchmarks/teacher_scaling.py", *sys.argv[1:]]),
            "config": str(cfg.relative_to(ROOT)) if cfg.is_relative_to(ROOT) else args.config,
            "common_overrides": common, "teacher_ranks": args.nproc, "run_dir": str(root)}


def unit_key(over: list[str], per: str) -> list[str]:
    """What the lr is chosen for: the overrides but the seed (per='variant') or the dense architecture's ('arch')."""
    if per == "arch":
        return [o for o in over if o.split("=")[0] in ARCH_KEYS]
    return [o for o in over if o.split("=")[0] != "experiment.seed"]


def unit_name(over: list[str], variants, per: str) -> str:  # noqa: ANN001 - [(name, axis, overrides)]
    """The selection unit of a variant's overrides, named after the first variant that has it."""
    key = unit_key(over, per)
    return next(n for n, _, o in variants if unit_key(o, per) == key)


def select_lr(args, root: Path, common: list[str], variants, grid: list[float], kinds: dict,  # noqa: ANN001
              binary: list[str]) -> dict:
    """Choose the dense lr of each variant family (or dense architecture: --lr-per) among `grid` on held-out
    *training* data.

    The best Adam lr falls with width (the large teacher is hurt by the small one's lr) and rises as the steps get
    fewer (r=0.1 has a third of the reference's), so one lr for every model measures the lr, not the axis. Each
    (unit, lr, seed) teacher trains on the training days minus the last
    `eval_days` and is scored, unsampled, on those held-out days (data.num_days - eval_days: the world's days do
    not depend on num_days). The lr with the best mean AUC (over seeds and binary tasks) is chosen; the evaluation
    day is never seen. Runs go to root/lr_select/<unit>-lr<lr>-seed<k>; --reuse applies to them too."""
    data = load_config(args.config, common).data
    n_days = data.num_days - data.eval_days
    if n_days - data.eval_days < 1:
        raise SystemExit(f"--lr-grid: data.num_days={data.num_days} with eval_days={data.eval_days} leaves no "
                         "training day once the held-out days are taken out (pass --lr-grid '' to skip selection)")
    units: dict[str, list[str]] = {}  # selection unit -> its overrides (a dense architecture with --lr-per arch)
    for _, _, over in variants:
        units.setdefault(unit_name(over, variants, args.lr_per), unit_key(over, args.lr_per))
    runs, val_ids = [], None
    for unit, unit_over in units.items():
        for lr in grid:
            for seed in range(args.select_seeds):
                name = f"{unit}-lr{lr:g}-seed{seed}"
                over = [*unit_over, f"teacher.lr={lr}", f"experiment.seed={seed}", f"data.num_days={n_days}"]
                run_dir = root / "lr_select" / name
                cfg_path, reusable = prepare_run(load_config(args.config, [*common, *over]), run_dir, args.reuse)
                if reusable:
                    log(f"lr selection {name}: reusing {run_dir}")
                else:
                    log(f"lr selection {name}: training on days 0-{n_days - data.eval_days - 1}, "
                        f"scoring held-out day(s) {n_days - data.eval_days}-{n_days - 1}")
                    train_teacher(cfg_path, run_dir, args.nproc)
                p = load_preds(run_dir / "teacher_eval.npz")
                val_ids = p["sample_id"] if val_ids is None else val_ids
                res = score(p, kinds, val_ids)  # raises if the held-out rows differ between runs
                runs.append({"unit": unit, "lr": lr, "seed": seed, "overrides": over,
                             **{f"val_auc/{t}": res[f"auc/{t}"] for t in binary}})
                log(f"lr selection {name}: " + ", ".join(f"val auc/{t} {res[f'auc/{t}']:.4f}" for t in binary))
    mean = {u: {lr: float(np.mean([r[f"val_auc/{t}"] for r in runs if r["unit"] == u and r["lr"] == lr
                                   for t in binary])) for lr in grid} for u in units}
    chosen = {a: max(m, key=m.get) for a, m in mean.items()}
    log(f"lr selection: chosen {chosen} (mean held-out AUC {mean})")
    return {"per": args.lr_per, "grid": grid, "seeds": args.select_seeds, "train_days": n_days - data.eval_days,
            "held_out_days": list(range(n_days - data.eval_days, n_days)), "held_out_rows": int(len(val_ids)),
            "criterion": f"mean held-out AUC over seeds and tasks {binary}", "mean_val_auc": mean, "chosen": chosen,
            "units": units, "runs": runs}


def eval_components(source, ids: np.ndarray) -> dict[str, np.ndarray] | None:  # noqa: ANN001
    """The synthetic world's click-logit components on the evaluation rows `ids` (sorted); None for other data."""
    if not isinstance(stored_source(source), SyntheticWorld):  # data.counts wraps the world
        return None
    sids, parts = [], []
    for day in sorted({int(i) >> 40 for i in ids}):
        sid, c = source.components(day, 0, source.num_rows(day))
        sids.append(sid)
        parts.append(c)
    sid = np.concatenate(sids)
    order = np.argsort(sid, kind="stable")
    pos = np.searchsorted(sid[order], ids)
    if not np.array_equal(sid[order][pos], ids):
        raise ValueError("evaluation rows are not all rows of the world's evaluation days")
    return {k: np.concatenate([p[k] for p in parts])[order][pos] for k in parts[0]}


def capture(preds: dict[str, np.ndarray], ids: np.ndarray, comps: dict[str, np.ndarray] | None) -> dict | None:
    """component_capture of a model's CTR predictions on the evaluation rows (see recdistill.distill.metrics)."""
    if comps is None or "pred_ctr" not in preds:
        return None
    pos = np.searchsorted(preds["sample_id"], ids)
    got = component_capture(torch.from_numpy(preds["pred_ctr"][pos]),
                            {k: torch.from_numpy(v) for k, v in comps.items()})
    return {k: v for k, v in got.items() if not np.isnan(v)}


def summarise(args: argparse.Namespace, plan: Plan, base: Base, rows: dict, preds: dict, partial: bool,
              lr_selection: dict | None = None) -> dict:
    """The result document: variants, deltas per axis against the reference, noise, checks."""
    root, common, t_start = plan.root, plan.common, plan.t_start
    base_sum, base_res, base_secs, base_preds = base.summary, base.res, base.seconds, base.preds
    ids, binary, base_capture = base.ids, base.binary, base.capture
    world = load_config(args.config, common).data
    ref = preds.get("reference")
    y = {t: base_preds[f"label_{t}"].astype(bool) for t in binary}
    npos = {t: int(y[t].sum()) for t in binary}
    noise: dict = {"eval_rows": len(ids), "positives": npos,
                   "hanley_mcneil_se": {t: auc_standard_error(base_res[f"auc/{t}"], npos[t], len(ids) - npos[t])
                                        for t in binary}}
    deltas: dict = {}
    pos = {n: np.searchsorted(p["sample_id"], ids) for n, p in preds.items()}
    # the bootstrap (the slow part: ~1 min per grid) is left to the final write; partial writes carry NaN SEs
    nb = 0 if partial else 40 if args.quick else args.bootstrap

    def compare(x: str, z: str) -> dict:
        out = {}
        for t in binary:
            out[f"auc_delta/{t}"] = rows[x]["eval"][f"auc/{t}"] - rows[z]["eval"][f"auc/{t}"]
            out[f"paired_se/{t}"] = paired_bootstrap(y[t], preds[x][f"pred_{t}"][pos[x]],
                                                     preds[z][f"pred_{t}"][pos[z]], nb) if nb else float("nan")
        return out

    if ref is not None:
        for name in preds:
            if name != "reference":
                deltas[name] = {"axis": rows[name]["axis"], **compare(name, "reference")}
    # Training noise: every variant X may have repeats X_seed1, X_seed2, ... (another experiment.seed); the
    # run-to-run sd of a teacher AUC is pooled over all (X, X_seedK) pairs: sd^2 = mean((a - b)^2 / 2).
    def auc_of(name: str, t: str) -> float:
        return rows[name]["eval"][f"auc/{t}"]

    pairs = [(n, r) for n in preds if "_seed" not in n for r in seed_runs(n, preds)[1:]]
    run_sd = {t: float(np.sqrt(np.mean([(auc_of(a, t) - auc_of(b, t)) ** 2 / 2 for a, b in pairs]))) if pairs
              else 0.0 for t in binary}
    noise["seed_pairs"] = [f"{b} - {a}" for a, b in pairs]
    noise["run_sd"] = run_sd
    seed = deltas.get("reference_seed1", {})
    if seed:
        noise["seed_repeat_auc_delta"] = {t: seed[f"auc_delta/{t}"] for t in binary}
    axes = {}
    for axis, (up, down) in AXES.items():
        if up not in preds or down not in preds:
            continue
        ups, downs = seed_runs(up, preds), seed_runs(down, preds)
        c = compare(up, down)
        a = axes[axis] = {"scaled_minus_unscaled": f"{up} - {down}", "runs": {"scaled": ups, "unscaled": downs},
                          **{f"auc_gain/{t}": float(np.mean([auc_of(n, t) for n in ups])
                                                    - np.mean([auc_of(n, t) for n in downs])) for t in binary},
                          **{f"paired_se/{t}": c[f"paired_se/{t}"] for t in binary}}
        for t in binary:
            # gain of seed means; its training noise sd is run_sd * sqrt(1/n_up + 1/n_down)
            train_se = run_sd[t] * np.sqrt(1 / len(ups) + 1 / len(downs))
            thr = 2 * float(np.nanmax([c[f"paired_se/{t}"], train_se]))
            a[f"threshold/{t}"] = thr
            a[f"raises/{t}"] = bool(a[f"auc_gain/{t}"] > thr)
    checks = {}
    if "reference" in rows and "eval" in rows["reference"]:
        checks["teacher_beats_base"] = {t: rows["reference"]["eval"][f"auc/{t}"] - base_res[f"auc/{t}"]
                                        for t in binary}
    for ax, a in axes.items():
        checks[f"{ax}_raises"] = {t: a[f"raises/{t}"] for t in binary}
    return {
        **provenance(args, root, common), "partial": partial, "wall_seconds": time.perf_counter() - t_start,
        "world": {"num_days": world.num_days, "samples_per_day": world.samples_per_day,
                  "data_history_len": world.history_len},
        "bayes": {f"auc/{t}": base_res[f"bayes_auc/{t}"] for t in binary}
        | {f"ne/{t}": base_res[f"bayes_ne/{t}"] for t in binary},
        "base": {"overrides": BASE_STUDENT, "seconds": base_secs,
                 "train_samples": base_sum.get("train/samples"),
                 "eval": {k: v for k, v in base_res.items() if k.split("/")[0] in ("auc", "ne")},
                 "capture_ctr": base_capture},
        "lr_selection": lr_selection,
        "variants": rows, "deltas_vs_reference": deltas, "axes": axes, "noise": noise, "checks": checks,
    }


if __name__ == "__main__":
    RESULTS.mkdir(parents=True, exist_ok=True)
    main()
