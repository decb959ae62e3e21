"""Synthetic-world generation throughput: samples/s and events/s at history 1K and 20K.

    python benchmarks/data_bench.py            # ~1 min on 2 cores; writes benchmarks/results/data_gen-<cpu>.json
    python benchmarks/data_bench.py --quick    # smaller, for a smoke run
    python benchmarks/data_bench.py --threads 1 --out /tmp/data_gen-1thread.json

Measures SyntheticWorld.read() directly (one thread; median of several repeats), the same reads with the teacher's
sampling view applied inside the world (dropped rows get no history), and passes of BatchLoader (generation on
its background thread, consumer idle), without a view and with the teacher's. The last line of output is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch
from _common import cpu_name, write_result  # benchmarks/ is sys.path[0] when run as a script

from recdistill.config import load_config
from recdistill.data.loader import BatchLoader
from recdistill.data.world import SyntheticWorld


def measure(history: int, rows: int, repeats: int) -> dict:
    """Direct reads (unsampled, and with the teacher view applied inside the world), then BatchLoader passes."""
    cfg = load_config(None, [f"data.history_len={history}", f"data.samples_per_day={rows * repeats}"])
    world = SyntheticWorld(cfg.data)
    teacher = cfg.sampling.teacher
    world.read(1, 0, min(rows, 256))  # warm up (the day's popularity table is built once)
    direct, viewed, events, kept = [], [], 0, 0
    for r in range(repeats):
        t0 = time.perf_counter()
        b = world.read(1, r * rows, (r + 1) * rows)
        direct.append(time.perf_counter() - t0)
        events = int(b.history.offsets[-1])
        t0 = time.perf_counter()
        kept = len(world.read(1, r * rows, (r + 1) * rows, view=teacher))
        viewed.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    n = sum(len(b) for b in BatchLoader(world, [1], batch_size=256, prefetch=4))
    loader_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_view = sum(len(b) for b in BatchLoader(world, [1], batch_size=256, view=teacher, prefetch=4))
    loader_view_s = time.perf_counter() - t0
    sec, vsec = statistics.median(direct), statistics.median(viewed)
    return {"history_len": history, "rows_per_read": rows, "repeats": repeats, "events_per_read": events,
            "mean_history": events / rows, "read_s_median": sec, "samples_per_s": rows / sec,
            "events_per_s": events / sec,
            "teacher_view": {"r": teacher.r, "q": teacher.q, "kept_per_read": kept, "read_s_median": vsec,
                             "population_samples_per_s": rows / vsec, "kept_samples_per_s": kept / vsec},
            "loader_batch_size": 256, "loader_samples": n, "loader_samples_per_s": n / loader_s,
            "loader_teacher_view": {"kept_samples": n_view, "kept_samples_per_s": n_view / loader_view_s,
                                    "population_samples_per_s": rows * repeats / loader_view_s},
            "shapes": {"dense": list(b.dense.shape), "sparse_keys": b.sparse.keys(),
                       "sparse_ids": int(b.sparse.values().numel()), "history_fields": sorted(b.history.fields),
                       "history_events": events}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="result JSON path (default: benchmarks/results/data_gen-<cpu>.json)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's). The loader's jagged gathers run torch ops; on a "
                        "busy machine one thread avoids OpenMP barrier waits there (docs/LOG.md)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = 0.25 if args.quick else 1.0
    results = [measure(1024, int(8000 * scale), 3), measure(20000, int(1000 * scale), 3)]
    res = {"bench": "data_gen", "date": time.strftime("%Y-%m-%d"), "machine": cpu_name(), "cpus": os.cpu_count(),
           "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "torch_threads": torch.get_num_threads(), "quick": args.quick, "results": results,
           "note": "single process on a 2-core machine shared with other jobs: noisy, lower bounds; the BatchLoader "
                   "numbers moved up to 10x between runs here (its torch gathers suffer most from contention)"}
    out = write_result("data_gen", res, args.quick, args.out)
    for r in results:
        print(f"history {r['history_len']:>6}: {r['samples_per_s']:>10,.0f} samples/s  {r['events_per_s'] / 1e6:>6.1f} "
              f"M events/s  (teacher view in the world: {r['teacher_view']['population_samples_per_s']:,.0f} "
              f"population samples/s; through BatchLoader: {r['loader_samples_per_s']:,.0f} samples/s, with the "
              f"teacher view {r['loader_teacher_view']['population_samples_per_s']:,.0f} population samples/s)")
    print(f"wrote {out}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
