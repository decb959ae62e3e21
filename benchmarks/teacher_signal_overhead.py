"""Teacher training speed with forward distillation (signal writing) on vs off: the real trainer, same config.

    python benchmarks/teacher_signal_overhead.py          # ~4 min: results/teacher_signal_overhead-<cpu>.json
    python benchmarks/teacher_signal_overhead.py --quick  # smaller smoke run (result file gets a -quick suffix)
    python benchmarks/teacher_signal_overhead.py --repeats 5 --steps 300 --set data.batch_size=1024

One process (a one-rank gloo group: the DMP + DeepSpeed code path of torchrun runs unchanged). A pool of 60 batches
is generated once, before any timing, and every run trains on the same cycled list from freshly built weights, so
the data generator's CPU use is not in the measurement; what is timed is the trainer's own loop (train_step, window
commits every `signals.window_steps`, the final flush), i.e. the forward, the writer's copy and hand-off, the
backward and both optimizer steps, and the CPU the writer's background thread takes from the training thread.
Runs are interleaved (on, off, on, off, ...) so a drift of the shared machine hits both modes alike; the result is
the median steps/s of each mode and their ratio (target: on/off >= 0.98 on CPU), the same for process CPU time
per step (robust to other jobs' load, which the wall clock is not), the 1-min load average at each run's start and
end, and each on-run's `SignalWriter.stats` (write_s: training-thread time inside write() — the direct cost on the
training thread; serializer_cpu_s: the background thread).
The last line of output is one JSON object.

The measured figures and what they say about this machine's noise: docs/RESULTS.md (Teacher) and docs/LOG.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import torch
from _common import cpu_name, write_result  # benchmarks/ is sys.path[0] when run as a script

from recdistill.config import load_config
from recdistill.data.loader import BatchLoader
from recdistill.data.source import build_source
from recdistill.train.distributed import destroy_distributed, init_distributed
from recdistill.train.teacher import TeacherTrainer

WARMUP = 5  # steps before the clock starts: first-call allocations and lazy initialisation
POOL = 60  # distinct batches generated (cycled)


def versions() -> dict[str, str]:
    """Versions of what the measurement depends on."""
    import deepspeed
    import torchrec

    out = {"python": platform.python_version(), "torch": torch.__version__, "torchrec": torchrec.__version__,
           "deepspeed": deepspeed.__version__}
    try:
        import fbgemm_gpu

        out["fbgemm_gpu"] = getattr(fbgemm_gpu, "__version__", "?")
    except ImportError:
        pass
    return out


def one_run(cfg, info, batches: list, write: bool, scratch: str) -> dict:  # noqa: ANN001
    """Build a fresh trainer (signals on or off), train on `batches`, return its timing."""
    run_cfg = cfg.model_copy(deep=True)
    run_cfg.teacher.write_signals = write
    run_cfg.signals.uri = os.path.join(scratch, f"sig-{time.monotonic_ns()}")
    trainer = TeacherTrainer(run_cfg, info, run_dir=os.path.join(scratch, "run"))
    ws = run_cfg.signals.window_steps
    try:
        for i, batch in enumerate(batches):
            if i == WARMUP:
                t0, c0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
            trainer.train_step(batch)
            trainer.steps += 1
            if trainer.steps % ws == 0:
                trainer.window_done()  # what TeacherTrainer.run does at a window's end (no checkpoint_dir here)
        if trainer.writer is not None:
            trainer.writer.commit_window()
            trainer.writer.flush()  # the last window's shard and marker are part of the cost
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        st = trainer.writer.stats if trainer.writer is not None else None
        timed = len(batches) - WARMUP
        return {"signals": write, "steps": timed, "seconds": round(secs, 4), "steps_per_s": timed / secs,
                "cpu_s": round(cpu, 4), "cpu_ms_per_step": 1e3 * cpu / timed,
                "loadavg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
                **({"rows_written": st.rows_written, "windows": st.windows_committed, "write_s": st.write_s,
                    "blocked_s": st.blocked_s, "serializer_cpu_s": st.serializer_cpu_s,
                    "write_share": st.write_s / secs} if st else {})}
    finally:
        trainer.close()
        trainer.log.finish(True)
        shutil.rmtree(run_cfg.signals.uri, ignore_errors=True)


def main() -> None:
    """Interleaved on/off runs; writes the result JSON and prints it as the last line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer, shorter runs")
    p.add_argument("--repeats", type=int, default=3, help="runs per mode (interleaved)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 400, quick 40)")
    p.add_argument("--config", default="configs/teacher/tiny.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, as torchrun sets "
                   "OMP_NUM_THREADS=1 per rank)")
    p.add_argument("--out", default=None, help="result path (default benchmarks/results/...)")
    args = p.parse_args()
    steps = args.steps or (40 if args.quick else 400)
    repeats = 2 if args.quick and args.repeats == 3 else args.repeats
    overrides = ["data.batch_size=512", "data.num_days=2", "signals.window_steps=50", "tracking.mode=disabled",
                 "tracking.progress=false", *args.overrides]
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(var, None)  # a lone process
    os.environ["WANDB_MODE"] = "disabled"
    cfg = load_config(args.config, overrides)
    # One intra-op thread by default: on a shared 2-core machine, a 2-thread OpenMP pool whose threads get
    # descheduled by other jobs waits at every barrier, so the same run's speed swings several-fold from minute to
    # minute (docs/LOG.md); torchrun gives each rank OMP_NUM_THREADS=1 for the same reason.
    torch.set_num_threads(args.threads)
    info = init_distributed()
    scratch = tempfile.mkdtemp(prefix="teacher-signal-bench-")
    try:
        need = steps + WARMUP
        # A pool of distinct sampled batches generated before any timing, cycled through for `need` steps:
        # generating every step's data anew costs minutes on a shared 2-core machine, and a repeated batch costs
        # the trainer and the writer exactly what a new one does (the writer does not look at the ids).
        pool = min(need, POOL)
        cfg.data.samples_per_day = max(cfg.data.samples_per_day, 3 * pool * cfg.data.batch_size)
        src = build_source(cfg.data)
        loader = BatchLoader(src, src.days()[:1], cfg.data.batch_size, view=cfg.sampling.teacher, prefetch=0,
                             drop_last=True)
        distinct = [b for _, b in zip(range(pool), loader, strict=False)]
        if len(distinct) < pool:
            raise RuntimeError(f"only {len(distinct)} batches generated, {pool} needed")
        batches = [distinct[i % pool] for i in range(need)]
        runs = []
        for i in range(2 * repeats):
            r = one_run(cfg, info, batches, write=i % 2 == 0, scratch=scratch)
            runs.append(r)
            print(f"run {i}: signals {'on ' if r['signals'] else 'off'} {r['steps_per_s']:.2f} steps/s "
                  f"({r['seconds']:.1f} s)" + (f", write_s {r['write_s']:.3f}, serializer_cpu_s "
                                               f"{r['serializer_cpu_s']:.3f}" if r["signals"] else ""),
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        destroy_distributed()
    on = [r["steps_per_s"] for r in runs if r["signals"]]
    off = [r["steps_per_s"] for r in runs if not r["signals"]]
    pairs = [a / b for a, b in zip(on, off, strict=True)]
    cpu_on = [r["cpu_ms_per_step"] for r in runs if r["signals"]]
    cpu_off = [r["cpu_ms_per_step"] for r in runs if not r["signals"]]
    res = {"bench": "teacher_signal_overhead", "device": cpu_name(), "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "versions": versions(), "quick": args.quick,
           "config": {"preset": cfg.teacher.preset, "batch_size": cfg.data.batch_size,
                      "history_len": cfg.data.history_len, "window_steps": cfg.signals.window_steps,
                      "tasks": len(cfg.data.tasks), "sharding": cfg.teacher.sharding,
                      "deepspeed": cfg.teacher.deepspeed, "timed_steps": steps, "warmup_steps": WARMUP,
                      "overrides": overrides},
           "runs": runs, "median_steps_per_s_on": statistics.median(on),
           "median_steps_per_s_off": statistics.median(off),
           "ratio_on_off": statistics.median(on) / statistics.median(off),
           "pair_ratios": pairs, "target_ratio_min": 0.98,
           # Process CPU time per step (all threads: trainer, writer thread, torch's pool): what the writer adds in
           # work, much less disturbed by other jobs on a shared machine than wall-clock steps/s.
           "median_cpu_ms_per_step_on": statistics.median(cpu_on),
           "median_cpu_ms_per_step_off": statistics.median(cpu_off),
           "cpu_ratio_off_on": statistics.median(cpu_off) / statistics.median(cpu_on),
           "write_share_of_wall_max": max(r["write_share"] for r in runs if r["signals"])}
    res["meets_target"] = res["ratio_on_off"] >= res["target_ratio_min"]
    path = write_result("teacher_signal_overhead", res, args.quick, args.out)
    print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
