"""Synthetic-world generation throughput: samples/s and events/s at history 1K and 20K.

    python benchmarks/data_bench.py            # ~1 min on 2 cores; writes benchmarks/results/data_gen-<cpu>.json
    python benchmarks/data_bench.py --quick    # smaller, for a smoke run

Measures SyntheticWorld.read() directly (one thread) and through BatchLoader (generation on its background
thread, consumer idle), median of several repeats. The last line of output is one JSON object.
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
    world = SyntheticWorld(load_config(None, [f"data.history_len={history}", f"data.samples_per_day={rows * 4}"]).data)
    world.read(1, 0, min(rows, 256))  # warm up
    direct, events = [], 0
    for r in range(repeats):
        t0 = time.perf_counter()
        b = world.read(1, r * rows, (r + 1) * rows)
        direct.append(time.perf_counter() - t0)
        events = int(b.history.offsets[-1])
    t0 = time.perf_counter()
    n = sum(len(b) for b in BatchLoader(world, [2], batch_size=256, prefetch=4))
    loader_s = time.perf_counter() - t0
    sec = statistics.median(direct)
    return {"history_len": history, "rows_per_read": rows, "repeats": repeats, "events_per_read": events,
            "mean_history": events / rows, "read_s_median": sec, "samples_per_s": rows / sec,
            "events_per_s": events / sec, "loader_samples": n, "loader_samples_per_s": n / loader_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="result JSON path (default: benchmarks/results/data_gen-<cpu>.json)")
    args = p.parse_args()
    scale = 0.25 if args.quick else 1.0
    results = [measure(1024, int(8000 * scale), 3), measure(20000, int(1000 * scale), 3)]
    res = {"bench": "data_gen", "date": time.strftime("%Y-%m-%d"), "machine": cpu_name(), "cpus": os.cpu_count(),
           "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "quick": args.quick, "results": results,
           "note": "single process; other load on the machine makes these lower bounds"}
    out = write_result("data_gen", res, args.quick, args.out)
    for r in results:
        print(f"history {r['history_len']:>6}: {r['samples_per_s']:>10,.0f} samples/s  {r['events_per_s'] / 1e6:>6.1f} "
              f"M events/s  (through BatchLoader: {r['loader_samples_per_s']:,.0f} samples/s)")
    print(f"wrote {out}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
