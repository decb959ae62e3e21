"""Signal store throughput, beside the machine's raw disk bandwidth measured in the same run.

    python benchmarks/signals_bench.py            # a few minutes; writes benchmarks/results/signals-<cpu>.json
    python benchmarks/signals_bench.py --quick    # smaller, for a smoke run

1. raw sequential write (with fsync) and read of one file, 8 MiB blocks;
2. writer: rows/s and MB/s of one rank (4096 rows x 3 tasks per step, a window every 50 steps, through commit);
3. slowdown of a simulated training loop (a few ms of CPU matmul per step) with the writer on vs off,
   interleaved runs, median ratio (target <= 1%);
4. reader: load + index of 9M stored rows, an incremental refresh adding a 10th million, and join throughput
   of random lookups against the 10M (target >= 5M rows/s).
The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from _common import cpu_name, write_result  # benchmarks/ is sys.path[0] when run as a script

from recdistill.data.sampling import SamplingConfig
from recdistill.signals.reader import SignalReader
from recdistill.signals.schema import SignalMeta
from recdistill.signals.writer import SignalWriter

META = SignalMeta(run_id="bench", teacher_version="bench", tasks=["ctr", "cvr", "watch_time"],
                  sampling=SamplingConfig(name="teacher", r=0.5))
ROW_BYTES = 8 + 4 * 3 + 8


def raw_bandwidth(d: Path, mib: int) -> dict:
    block = os.urandom(8 << 20)
    path = d / "raw.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(mib // 8):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    w = time.perf_counter() - t0
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass
    r = time.perf_counter() - t0
    path.unlink()
    return {"mib": mib, "write_mb_s": mib * 1.048576 / w, "read_mb_s": mib * 1.048576 / r,
            "read_note": "page cache not dropped: read bandwidth is an upper bound"}


def writer_throughput(d: Path, steps: int, rows: int) -> dict:
    ids = torch.arange(rows, dtype=torch.int64)
    logits = torch.randn(rows, 3)
    t0 = time.perf_counter()
    with SignalWriter(str(d / "w"), 0, META) as w:
        for s in range(steps):
            if s % 50 == 0:
                if w.window is not None:
                    w.commit_window()
                w.begin_window(s // 50)
            w.write(ids + s * rows, logits, s)
    sec = time.perf_counter() - t0
    n = steps * rows
    return {"steps": steps, "rows_per_step": rows, "rows_per_s": n / sec, "mb_s": n * ROW_BYTES / sec / 1e6,
            "bytes_on_disk": w.stats.bytes_written, "blocked_s": w.stats.blocked_s,
            "write_us_per_step": 1e6 * w.stats.write_s / steps,
            "serializer_cpu_us_per_step": 1e6 * w.stats.serializer_cpu_s / steps,
            "note": "rows/s through commit (close included); MB/s counts 28 B/row (id, 3 logits, step)"}


def training_loop(d: Path | None, steps: int, rows: int, a: torch.Tensor, b: torch.Tensor) -> tuple:
    """(seconds of the training loop, seconds of the final close, writer stats or None) for `steps` simulated
    steps, each a [rows, h] @ [h, h] matmul; with a writer when `d` is given."""
    ids = torch.arange(rows, dtype=torch.int64)
    w = SignalWriter(str(d), 0, META) if d is not None else None
    t0 = time.perf_counter()
    for s in range(steps):
        logits = (a @ b) @ b[:, :3]  # the "model": a hidden layer and a 3-task head, contiguous [rows, 3]
        if w is not None:
            if s % 50 == 0:
                if w.window is not None:
                    w.commit_window()
                w.begin_window(s // 50)
            w.write(ids + s * rows, logits, s)
    loop = time.perf_counter() - t0
    if w is not None:
        w.close()
    return loop, time.perf_counter() - t0 - loop, w.stats if w is not None else None


def slowdown(d: Path, steps: int, rows: int, repeats: int, hidden: int) -> dict:
    torch.manual_seed(0)
    a, b = torch.randn(rows, hidden), torch.randn(hidden, hidden)
    training_loop(None, 5, rows, a, b)
    on, off, close, write_s, ser_s = [], [], [], [], []
    for i in range(repeats):  # interleaved, so drift of the machine hits both alike
        os.sync()  # no dirty pages from earlier runs: kernel writeback would steal one of the two cores
        off.append(training_loop(None, steps, rows, a, b)[0])
        os.sync()
        loop, closing, stats = training_loop(d / f"loop{i}", steps, rows, a, b)
        on.append(loop)
        close.append(closing)
        write_s.append(stats.write_s)
        ser_s.append(stats.serializer_cpu_s)
        shutil.rmtree(d / f"loop{i}")
    ratios = [x / y for x, y in zip(on, off, strict=True)]
    return {"steps": steps, "rows_per_step": rows, "matmul_hidden": hidden,
            "step_ms_off": 1000 * statistics.median(off) / steps,
            "overhead_ms_per_step": 1000 * (statistics.median(on) - statistics.median(off)) / steps,
            "step_ms_on": 1000 * statistics.median(on) / steps, "ratio_on_off_median": statistics.median(ratios),
            "ratios": ratios, "slowdown_pct": 100 * (statistics.median(ratios) - 1), "target_pct": 1.0,
            "final_close_s_median": statistics.median(close),
            "on_thread_us_per_step": 1e6 * statistics.median(write_s) / steps,
            "on_thread_pct": 100 * statistics.median(write_s) / statistics.median(off),
            "serializer_cpu_us_per_step": 1e6 * statistics.median(ser_s) / steps,
            "note": "torch uses 1 thread; the writer's background thread needs the other core, which the other "
                    "processes on this shared machine also use: on_thread_pct is the floor on an idle core"}


def reader_join(d: Path, stored: int, queries: int) -> dict:
    per_window = 1_000_000
    windows = stored // per_window
    rng = np.random.default_rng(0)

    def write(wins: range) -> None:
        with SignalWriter(str(d / "r"), 0, META) as w:
            for win in wins:
                w.begin_window(win)
                ids = torch.from_numpy(rng.permutation(per_window).astype(np.int64) + win * per_window)
                w.write(ids, torch.randn(per_window, 3), win)
                w.commit_window()

    write(range(windows - 1))
    t0 = time.perf_counter()
    r = SignalReader(str(d / "r"))
    load = time.perf_counter() - t0
    write(range(windows - 1, windows))  # the teacher commits one more window: an incremental refresh
    t0 = time.perf_counter()
    assert r.refresh() == 1
    refresh = time.perf_counter() - t0
    q = torch.from_numpy(rng.integers(0, stored * 1.05, queries))  # ~5% misses
    t0 = time.perf_counter()
    found = 0
    for chunk in q.split(65536):
        found += int(r.lookup(chunk)[1].sum())
    sec = time.perf_counter() - t0
    return {"stored_rows": r.stats.rows, "load_and_index_s": load, "load_rows": stored - per_window,
            "refresh_one_window_s": refresh, "queries": queries, "batch": 65536,
            "join_rows_per_s": queries / sec, "found_fraction": found / queries, "target_rows_per_s": 5e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = p.parse_args()
    q = args.quick
    torch.set_num_threads(1)  # one core for the "trainer", one left for the writer thread
    d = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        res = {"bench": "signals", "date": time.strftime("%Y-%m-%d"), "machine": cpu_name(), "cpus": os.cpu_count(),
               "python": platform.python_version(), "torch": torch.__version__, "pyarrow": pa.__version__,
               "quick": q, "scratch": str(d),
               "raw_disk": raw_bandwidth(d, 64 if q else 512),
               "writer": writer_throughput(d, 50 if q else 400, 4096),
               "training_loop": slowdown(d, 60 if q else 300, 4096, 3 if q else 7, 256),
               "training_loop_long_steps": slowdown(d, 20 if q else 80, 4096, 3 if q else 5, 1024),
               "reader": reader_join(d, 1_000_000 if q else 10_000_000, 500_000 if q else 5_000_000)}
    finally:
        shutil.rmtree(d, ignore_errors=True)
    out = write_result("signals", res, q)
    print(f"raw disk: write {res['raw_disk']['write_mb_s']:.0f} MB/s, read {res['raw_disk']['read_mb_s']:.0f} MB/s")
    print(f"writer: {res['writer']['rows_per_s'] / 1e6:.2f} M rows/s, {res['writer']['mb_s']:.0f} MB/s per rank")
    for k in ("training_loop", "training_loop_long_steps"):
        t = res[k]
        print(f"{k}: {t['step_ms_off']:.1f} ms steps, {t['slowdown_pct']:+.2f}% with the writer on "
              f"({t['overhead_ms_per_step']:+.2f} ms/step; target <= 1%)")
    print(f"reader: {res['reader']['join_rows_per_s'] / 1e6:.1f} M rows/s joined against "
          f"{res['reader']['stored_rows'] / 1e6:.0f} M stored rows (target >= 5 M/s)")
    print(f"wrote {out}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
