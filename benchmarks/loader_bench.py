"""Input pipeline throughput (issue 16): BatchLoader against raw generation, view cost, resume cost.

    python benchmarks/loader_bench.py            # minutes on 2 idle cores: benchmarks/results/loader-<cpu>.json
    python benchmarks/loader_bench.py --quick    # small, for a smoke run (writes ...-quick.json)
    python benchmarks/loader_bench.py --workers 0 1 2 4 --out /tmp/loader.json

Steps, each at history 1,024 and 20K events of the synthetic world:
1. raw: SyntheticWorld.read of the day's rows in chunks, one thread (what the loader cannot beat per worker); and
   for each worker count n > 1, n raw processes at once, each its 1/n of the chunks (what n workers cannot beat per
   worker on this machine: `per_worker_vs_raw_parallel`);
2. loader: a full pass of BatchLoader over the same rows with 0 (background thread), 1, 2 ... worker processes,
   consumer idle; samples/s, per worker, and the ratio to raw (worker start-up included); and CPU seconds, which
   a busy machine inflates less than wall time: raw's CPU over the readers' for the same rows; and the rate over
   the second half of a pass's batches (workers started, arenas made);
3. view: the same pass through a view with r = 0.1 (q = 1) against one with r = 1.0 (keeps every row): the cost
   ratio (pushdown makes a dropped row cost its features and deciding label, not its history), also in CPU seconds
   and with 10x larger work items (what is fixed per work item); and the floor: the kept rows alone, made from
   their ids known beforehand (`floor_ratio`: what the view would cost if deciding which rows to keep were free);
4. resume: the time to the first batch after k batches, by the saved position (LockstepBatches.seek) and by
   replaying k batches (what a checkpoint without a position costs; k batches of 256 rows span k / 4 work items).
The last line of output is one JSON object. Numbers on a machine shared with other jobs are lower bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch
from _common import cpu_name, write_result  # benchmarks/ is sys.path[0] when run as a script

from recdistill.config import load_config
from recdistill.data.loader import BatchLoader
from recdistill.data.sampling import SamplingConfig
from recdistill.data.world import SyntheticWorld
from recdistill.runtime import tune_allocator

BATCH = 256
CHUNK = 4 * BATCH  # the loader's default work item


def make_world(history: int, rows: int) -> SyntheticWorld:
    w = SyntheticWorld(load_config(None, [f"data.history_len={history}", f"data.samples_per_day={rows}",
                                          "data.num_days=3"]).data)
    w.read(1, 0, 16)  # the day's popularity table, built once here (each worker builds its own)
    return w


def timed(fn, repeats: int) -> float:  # noqa: ANN001
    """Least seconds of `repeats` calls: on a machine shared with other jobs the least disturbed call is the best
    estimate of the code's own cost (a median moves with the others' load)."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds of this process, of the loader's worker processes that have exited). Workers are children of
    multiprocessing's fork server, which reaps them before it reports their exit (so before the loader's pass
    returns): their CPU is in the server's cutime + cstime (/proc/<pid>/stat fields 16-17), plus this process's own
    waited-for children."""
    from multiprocessing import forkserver

    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    kids = c.ru_utime + c.ru_stime
    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if pid:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        kids += (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # cutime, cstime (fields 16, 17)
    return time.process_time(), kids


def cpu_timed(fn, repeats: int) -> tuple[float, float]:  # noqa: ANN001
    """Least (own, children's) CPU seconds of `repeats` calls (see timed)."""
    own, kids = [], []
    for _ in range(repeats):
        a = cpu_seconds()
        fn()
        b = cpu_seconds()
        own.append(b[0] - a[0])
        kids.append(b[1] - a[1])
    return min(own), min(kids)


def raw(w: SyntheticWorld, rows: int, repeats: int) -> dict:
    """Step 1: generation alone, chunk by chunk, one thread; each chunk dropped before the next is made, as the
    loader's consumer drops batches (kept, they would page-fault fresh memory throughout and understate raw)."""
    def run() -> list[int]:
        return [len(w.read(1, s, min(s + CHUNK, rows))) for s in range(0, rows, CHUNK)]
    sec = timed(run, repeats)
    return {"seconds": sec, "samples_per_s": rows / sec, "cpu_s": cpu_timed(run, repeats)[0]}


def _raw_share(w: SyntheticWorld, rows: int, k: int, n: int, barrier, out) -> None:  # noqa: ANN001 - mp objects
    """In a child process: raw generation of every n-th chunk from chunk k, timed from a barrier all n share."""
    tune_allocator()
    torch.set_num_threads(1)
    w.read(1, 0, 16)
    starts = range(k * CHUNK, rows, n * CHUNK)
    barrier.wait()
    t0 = time.perf_counter()
    done = sum(len(w.read(1, s, min(s + CHUNK, rows))) for s in starts)
    out.put((done, time.perf_counter() - t0))


def raw_parallel(w: SyntheticWorld, rows: int, n: int, raw_rate: float, repeats: int) -> dict:
    """Raw generation in n processes at once (from the fork server, as loader workers are), each its 1/n of the
    chunks and no consumer: the rate per process the machine allows n generators. n loader workers cannot beat it
    per worker, and they share the cores with the training process besides."""
    from recdistill.data.loader import _worker_context

    # the loader's own context: the fork server is started once per process, with the modules it preloads then
    # (started here with none, every loader worker after it would import torch itself: seconds of start-up)
    ctx = _worker_context()
    best = 0.0
    for _ in range(repeats):
        barrier, out = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_raw_share, args=(w, rows, k, n, barrier, out)) for k in range(n)]
        for p in procs:
            p.start()
        got = [out.get() for _ in procs]
        for p in procs:
            p.join()
        best = max(best, sum(r / s for r, s in got) / n)
    return {"processes": n, "per_process_samples_per_s": best, "per_process_vs_raw": best / raw_rate}


def loader_pass(w: SyntheticWorld, workers: int, view: SamplingConfig | None = None,
                chunk_rows: int | None = None) -> tuple[int, float]:
    """(rows delivered, seconds) of one BatchLoader pass over day 1."""
    t0 = time.perf_counter()
    n = sum(len(b) for b in BatchLoader(w, [1], BATCH, view=view, workers=workers, chunk_rows=chunk_rows))
    return n, time.perf_counter() - t0


def second_half(w: SyntheticWorld, workers: int, repeats: int) -> float:
    """Samples/s over the second half of a pass, once the workers are started and their arenas made (at 20K events a
    worker's first parts each fault in a fresh arena): parts arrive whole (their batches are cut at once), so the
    rate is taken between part arrivals: (parts after the middle one) x CHUNK rows over the time from the middle
    part's first batch to the last part's. Passes are unsampled, so every part is CHUNK rows, 4 batches. Best of
    `repeats` passes."""
    best = 0.0
    for _ in range(repeats):
        starts = []
        for i, _b in enumerate(BatchLoader(w, [1], BATCH, workers=workers)):
            if i % (CHUNK // BATCH) == 0:
                starts.append(time.perf_counter())
        mid, last = len(starts) // 2, len(starts) - 1
        best = max(best, (last - mid) * CHUNK / max(starts[last] - starts[mid], 1e-9))
    return best


def loaders(w: SyntheticWorld, rows: int, workers: list[int], raw_rate: float, raw_cpu: float,
            repeats: int) -> list[dict]:
    """Step 2: loader passes with each worker count. A pass includes starting the workers (from the fork server,
    the source pickled to each; their arenas' first pages), paid once per run: `startup_s` is a pass over one work
    item, and the steady rate leaves it out ((rows - one item) / (seconds - startup_s))."""
    out = []
    for k in workers:
        sec = timed(lambda k=k: loader_pass(w, k), repeats)
        startup = timed(lambda k=k: loader_pass_rows(w, k, CHUNK), repeats)
        steady = (rows - CHUNK) / max(sec - startup, 1e-9)
        per = steady / max(k, 1)
        own, kids = cpu_timed(lambda k=k: loader_pass(w, k), repeats)
        own1, kids1 = cpu_timed(lambda k=k: loader_pass_rows(w, k, CHUNK), repeats)
        readers, readers1 = (kids, kids1) if k else (own, own1)
        half = second_half(w, k, repeats)
        out.append({"workers": k, "second_half_samples_per_s": half,
                    "second_half_per_worker_vs_raw": half / max(k, 1) / raw_rate, "seconds": sec,
                    "samples_per_s": rows / sec, "startup_s": startup,
                    "steady_samples_per_s": steady, "steady_samples_per_s_per_worker": per,
                    "per_worker_vs_raw": per / raw_rate, "cpu_s_main": own, "cpu_s_readers": readers,
                    "startup_cpu_s_readers": readers1,
                    # raw's CPU seconds over the readers' for the same rows, start-up (a pass over one work item)
                    # left out as in the steady rate: 1.0 = no overhead
                    "steady_cpu_raw_over_readers": raw_cpu * (rows - CHUNK) / rows / max(readers - readers1, 1e-9)})
    return out


def loader_pass_rows(w: SyntheticWorld, workers: int, rows: int) -> None:
    """One BatchLoader pass over the first `rows` rows of day 1 (a world with that many rows a day, same seed)."""
    part = SyntheticWorld(w.cfg.model_copy(update={"samples_per_day": rows}))
    part._day_cache = w._day_cache  # the same day tables (they do not depend on samples_per_day)
    sum(len(b) for b in BatchLoader(part, [1], BATCH, workers=workers))


def kept_only(w: SyntheticWorld, rows: int, view: SamplingConfig) -> float:
    """Seconds to make only the rows `view` keeps, work item by work item, their ids known beforehand (read_ids):
    what a view costs if deciding which rows it keeps were free, the floor no pushdown can go below."""
    kept = [w.read(1, s, min(s + CHUNK, rows), view).sample_id.numpy() for s in range(0, rows, CHUNK)]
    t0 = time.perf_counter()
    for ids in kept:
        w.read_ids(ids)
    return time.perf_counter() - t0


def view_cost(w: SyntheticWorld, rows: int, repeats: int) -> dict:
    """Step 3: a pass through r = 0.1 against one through r = 1.0 (both q = 1; one thread), in wall and CPU seconds;
    both with work items of 10 x CHUNK rows; and the floor: the kept rows alone, as if deciding were free."""
    low, full = SamplingConfig(name="r0.1", r=0.1, q=1.0), SamplingConfig(name="r1", r=1.0, q=1.0)
    kept = loader_pass(w, 0, low)[0]
    s_low = timed(lambda: loader_pass(w, 0, low), repeats)
    s_full = timed(lambda: loader_pass(w, 0, full), repeats)
    s_floor = min(kept_only(w, rows, low) for _ in range(repeats))
    c_low = cpu_timed(lambda: loader_pass(w, 0, low), repeats)[0]
    c_full = cpu_timed(lambda: loader_pass(w, 0, full), repeats)[0]
    big_low = timed(lambda: loader_pass(w, 0, low, 10 * CHUNK), repeats)
    big_full = timed(lambda: loader_pass(w, 0, full, 10 * CHUNK), repeats)
    return {"kept_share_r0.1": kept / rows, "seconds_r0.1": s_low, "seconds_r1.0": s_full, "cost_ratio": s_low / s_full,
            "cpu_s_r0.1": c_low, "cpu_s_r1.0": c_full, "cpu_cost_ratio": c_low / c_full,
            "seconds_r0.1_chunk_x10": big_low, "seconds_r1.0_chunk_x10": big_full,
            "cost_ratio_chunk_x10": big_low / big_full,
            # the kept rows made alone (no deciding, no loader) against the full pass: 0.2x is reachable only if
            # this is well under it
            "seconds_kept_rows_only": s_floor, "floor_ratio": s_floor / s_full}


def resume_cost(w: SyntheticWorld, ks: list[int]) -> list[dict]:
    """Step 4: time to the first batch after k batches, from the saved position and by replaying."""
    import torch.distributed as dist

    from recdistill.train.lockstep import LockstepBatches

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    def feed() -> LockstepBatches:
        return LockstepBatches(BatchLoader(w, [1], BATCH, prefetch=0), BATCH, None, fallback=lambda: w.read(1, 0, 1))

    out = []
    for k in ks:
        first = feed()
        for _ in range(k):
            first.next()
        state = first.state()
        t0 = time.perf_counter()
        by_position = feed()
        by_position.seek(state)
        by_position.next()
        seek_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        replay = feed()
        replay.skip(k, False)
        replay.next()
        out.append({"k": k, "seek_s": seek_s, "replay_s": time.perf_counter() - t0})
    return out


def measure(history: int, rows: int, workers: list[int], repeats: int, ks: list[int]) -> dict:
    w = make_world(history, rows)
    base = raw(w, rows, repeats)
    parallel = [raw_parallel(w, rows, k, base["samples_per_s"], repeats) for k in workers if k > 1]
    out = loaders(w, rows, workers, base["samples_per_s"], base["cpu_s"], repeats)
    for x in out:  # per worker against n raw generators running at once on this machine
        same = [p["per_process_samples_per_s"] for p in parallel if p["processes"] == x["workers"]]
        if same:
            x["per_worker_vs_raw_parallel"] = x["steady_samples_per_s_per_worker"] / same[0]
    return {"history_len": history, "rows": rows, "batch_size": BATCH, "chunk_rows": CHUNK, "raw": base,
            "raw_parallel": parallel, "loader": out,
            "view": view_cost(w, rows, repeats),
            "resume": resume_cost(w, [k for k in ks if k < rows // BATCH])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=None, help="result JSON path (default: benchmarks/results/loader-<cpu>.json)")
    args = p.parse_args()
    # the allocator as every entry point sets it (recdistill.runtime), so raw, the thread and the workers (which
    # tune themselves) all run under the settings training runs under; RECDISTILL_MALLOC=default measures glibc's
    tuned = tune_allocator()
    torch.set_num_threads(1)  # one core per reader; worker processes run one thread each as well
    q = args.quick
    load_before = os.getloadavg()
    # 128 work items at 1,024 events, 48 at 20K: passes of seconds, so that the workers' start-up and the warm-up
    # of their first shared arenas are a small part of them, as in a training run
    results = [measure(1024, 4096 if q else 131072, args.workers, 1 if q else 5, [1, 8] if q else [1, 32, 96]),
               measure(20000, 2048 if q else 49152, args.workers, 1 if q else 5, [1, 4] if q else [1, 8, 16])]
    load = os.getloadavg()
    res = {"bench": "loader", "date": time.strftime("%Y-%m-%d"), "machine": cpu_name(), "cpus": os.cpu_count(),
           "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "quick": q, "allocator_tuned": tuned, "load_average_before": load_before, "load_average_after": load,
           "results": results}
    out = write_result("loader", res, q, args.out)
    for r in results:
        lo = ", ".join(f"{x['workers']}w {x['samples_per_s']:,.0f}/s, steady {x['steady_samples_per_s']:,.0f}/s "
                       f"({x['per_worker_vs_raw']:.2f}x raw per worker, CPU {x['steady_cpu_raw_over_readers']:.2f}x; "
                       f"second half {x['second_half_per_worker_vs_raw']:.2f}x; "
                       f"start {x['startup_s']:.2f}s)" for x in r["loader"])
        v = r["view"]
        print(f"history {r['history_len']:>6}: raw {r['raw']['samples_per_s']:,.0f} samples/s; loader {lo}; "
              f"r=0.1 costs {v['cost_ratio']:.2f}x of r=1.0 (CPU {v['cpu_cost_ratio']:.2f}x, 10x work items "
              f"{v['cost_ratio_chunk_x10']:.2f}x; kept rows alone {v['floor_ratio']:.2f}x); "
              + "".join(f"{p['processes']} raw processes at once {p['per_process_vs_raw']:.2f}x raw each; "
                        for p in r["raw_parallel"]) + "resume "
              + ", ".join(f"k={x['k']}: {x['seek_s']:.3f}s by position, {x['replay_s']:.3f}s replayed"
                          for x in r["resume"]))
    print(f"wrote {out} (load average {load[0]:.2f})")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
