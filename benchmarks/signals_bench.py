"""Signal store throughput, beside the machine's raw disk bandwidth measured in the same run.

    python benchmarks/signals_bench.py            # a few minutes; writes benchmarks/results/signals-<cpu>.json
    python benchmarks/signals_bench.py --quick    # smaller, for a smoke run

1. raw sequential write (with fsync) and read of one file, 8 MiB blocks;
2. writer: rows/s and MB/s of one rank (4096 rows x 3 tasks per step, a window every 50 steps, through commit);
3. slowdown of a simulated training loop (a few ms of CPU matmul per step) with the writer on vs off,
   interleaved runs, median ratio (target <= 1%);
4. reader: load + index of 9M stored rows, an incremental refresh adding a 10th million, and join throughput
   of random lookups against the 10M (target >= 5M rows/s);
5. bounded reader: a 20M-row store in day order (plus replayed rows) against a 64 MB budget, each reader in its own
   child process: peak RSS above the process's baseline, index build / open time, join rows/s of the student's
   stream (its view in day order, student-sized batches and 64K batches) and of random-order lookups, the
   in-memory reader beside it (target >= 5M rows/s, peak RSS bounded by the budget, not by the store).

    python benchmarks/signals_bench.py --only bounded [--quick]   # section 5 alone -> signals_bounded-<cpu>.json

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
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
from recdistill.hashing import hash_uniform
from recdistill.signals.bounded import BoundedSignalReader
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


def write_day_ordered(uri: str, stored: int, per_window: int, replay: int) -> None:
    """A teacher's store in day order: window w holds ids w*per_window.. in the teacher's own (shuffled) order;
    every window after the first also replays `replay` ids of the window before at a later step (they lose)."""
    rng = np.random.default_rng(1)
    with SignalWriter(uri, 0, META) as w:
        for win in range(stored // per_window):
            w.begin_window(win)
            ids = torch.from_numpy(rng.permutation(per_window).astype(np.int64) + win * per_window)
            w.write(ids, torch.randn(per_window, 3), win)
            if win:
                w.write(ids[:replay] - per_window, torch.randn(replay, 3), 10**6 + win)
            w.commit_window()


def student_stream(stored: int, per_window: int, batch: int, rate: float):
    """The student's view (a `rate` subset by hash) of the store's ids in ascending order, in batches (a batch
    can span two windows)."""
    carry = np.zeros(0, np.int64)
    for win in range(stored // per_window):
        ids = np.arange(win * per_window, (win + 1) * per_window, dtype=np.int64)
        ids = np.concatenate([carry, ids[hash_uniform(ids, 3) < rate]])
        cut = len(ids) - len(ids) % batch
        if cut:
            yield from torch.from_numpy(ids[:cut]).split(batch)
        carry = ids[cut:]
    if len(carry):
        yield torch.from_numpy(carry)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb() -> float:
    """The resident set now (Linux), file-backed mapped pages included."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed_join(reader: SignalReader, batches) -> dict:  # noqa: ANN001 - an iterable of tensors
    """Rows/s inside lookup over `batches`, by the wall clock and by this process's CPU time (on a machine shared
    with other work, CPU time is the nearer estimate of an idle machine's wall clock), and how many were found."""
    sec, cpu, n, found = 0.0, 0.0, 0, 0
    for q in batches:
        t0, c0 = time.perf_counter(), time.process_time()
        f = reader.lookup(q)[1]
        sec, cpu = sec + time.perf_counter() - t0, cpu + time.process_time() - c0
        n, found = n + len(q), found + int(f.sum())
    return {"rows_per_s": n / sec, "rows_per_cpu_s": n / cpu, "queries": n, "found": found}


def join_child(kind: str, uri: str, cfg: dict, out) -> None:  # noqa: ANN001 - a multiprocessing queue
    """One reader in a fresh process: peak RSS over the process's baseline (imports), open time, join rates."""
    torch.set_num_threads(1)

    def make(at: str) -> SignalReader:
        if kind == "in_memory":
            return SignalReader(at)
        return BoundedSignalReader(at, memory_mb=cfg["budget_mb"], cache_dir=f"{cfg['cache']}-{Path(at).name}")

    # Warm-up on a one-window store: the code this reader runs (pages of numpy, torch and pyarrow libraries, the
    # allocator's first arenas) is mapped in before the baseline, so the peak above it is the reader's data.
    warm = make(cfg["warmup_uri"])
    for b in (cfg["batch"], 65536):
        timed_join(warm, student_stream(cfg["per_window"], cfg["per_window"], b, cfg["rate"]))
    del warm
    base = rss_mb()  # now, not the peak: the imports' transient peak would hide what the reader adds
    t0 = time.perf_counter()
    r = make(uri)
    res = {"open_s": time.perf_counter() - t0, "open_peak_rss_mb": peak_rss_mb() - base}
    if kind != "in_memory":
        t0 = time.perf_counter()
        r = make(uri)  # a second student of the same store: the index is reused
        res["reopen_s"] = time.perf_counter() - t0
    stored, pw = cfg["stored"], cfg["per_window"]
    for b in (cfg["batch"], 65536):
        res[f"student_batch{b}"] = timed_join(r, student_stream(stored, pw, b, cfg["rate"]))
        res[f"student_batch{b}"]["peak_rss_mb_so_far"] = peak_rss_mb() - base
    rng = np.random.default_rng(2)
    res["random_batch65536"] = timed_join(r, (torch.from_numpy(rng.integers(0, stored, 65536))
                                              for _ in range(cfg["random"])))
    res["random_batch65536"]["peak_rss_mb_so_far"] = peak_rss_mb() - base
    res.update(peak_rss_mb=peak_rss_mb(), baseline_rss_mb=base, reader_peak_rss_mb=peak_rss_mb() - base,
               stats=vars(r.stats), segment_loads=getattr(r, "segment_loads", None),
               segments=getattr(r, "_num_segments", None))
    out.put(res)


def bounded_reader(d: Path, stored: int, per_window: int, budget_mb: float, random_batches: int) -> dict:
    uri = str(d / "day_ordered")
    write_day_ordered(uri, stored, per_window, per_window // 100)
    write_day_ordered(str(d / "warmup"), per_window, per_window, 0)
    cfg = {"stored": stored, "per_window": per_window, "budget_mb": budget_mb, "cache": str(d / "index"),
           "batch": 512, "rate": 0.5, "random": random_batches, "warmup_uri": str(d / "warmup")}
    ctx, res = mp.get_context("spawn"), {}
    for kind in ("in_memory", "bounded"):
        q = ctx.Queue()
        proc = ctx.Process(target=join_child, args=(kind, uri, cfg, q))
        proc.start()
        res[kind] = q.get()
        proc.join()
    for k in ("student_batch512", "student_batch65536", "random_batch65536"):
        assert res["bounded"][k]["found"] == res["in_memory"][k]["found"], k  # the same join
    return {**{k: v for k, v in cfg.items() if k not in ("cache", "warmup_uri")}, **res,
            "target_rows_per_s": 5e6,
            "note": "each reader in its own spawned process; reader_peak_rss_mb = ru_maxrss minus VmRSS before the "
                    "reader was made (interpreter, libraries, and a warm-up of the same reader on a one-window "
                    "store, so library code paged in is not counted); open_peak_rss_mb the same after the first open "
                    "(the index build for the bounded reader); batch 512 is data.batch_size"}


def header(q: bool, d: Path) -> dict:
    return {"bench": "signals", "date": time.strftime("%Y-%m-%d"), "machine": cpu_name(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "pyarrow": pa.__version__,
            "numpy": np.__version__, "quick": q, "scratch": str(d), "load_avg_before": os.getloadavg()}


def print_bounded(b: dict) -> None:
    for kind in ("in_memory", "bounded"):
        r = b[kind]
        rates = ", ".join(f"{k} {r[k]['rows_per_s'] / 1e6:.1f} M/s ({r[k]['rows_per_cpu_s'] / 1e6:.1f} per CPU s)"
                          for k in
                          ("student_batch512", "student_batch65536", "random_batch65536"))
        print(f"{kind} reader of {b['stored'] / 1e6:.0f} M rows: peak RSS +{r['reader_peak_rss_mb']:.0f} MB, "
              f"open {r['open_s']:.1f} s; {rates}")
    print(f"(budget {b['budget_mb']} MB; target >= 5 M rows/s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=["all", "bounded"], default="all", help="bounded: section 5 alone")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = p.parse_args()
    q = args.quick
    torch.set_num_threads(1)  # one core for the "trainer", one left for the writer thread
    d = Path(tempfile.mkdtemp(dir=args.dir))
    # windows of 25K rows: a teacher rank's window at the default 50 steps of 512 samples (a shard must be well
    # under a segment of the budget)
    bounded = {"stored": 2_000_000, "per_window": 25_000, "budget_mb": 16, "random_batches": 5} if q else {
        "stored": 20_000_000, "per_window": 25_000, "budget_mb": 64, "random_batches": 20}
    try:
        res = header(q, d)
        if args.only == "all":
            res.update(raw_disk=raw_bandwidth(d, 64 if q else 512),
                       writer=writer_throughput(d, 50 if q else 400, 4096),
                       training_loop=slowdown(d, 60 if q else 300, 4096, 3 if q else 7, 256),
                       training_loop_long_steps=slowdown(d, 20 if q else 80, 4096, 3 if q else 5, 1024),
                       reader=reader_join(d, 1_000_000 if q else 10_000_000, 500_000 if q else 5_000_000))
        res["bounded_reader"] = bounded_reader(d, **bounded)
        res["load_avg_after"] = os.getloadavg()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    out = write_result("signals" if args.only == "all" else "signals_bounded", res, q)
    if args.only == "all":
        print(f"raw disk: write {res['raw_disk']['write_mb_s']:.0f} MB/s, "
              f"read {res['raw_disk']['read_mb_s']:.0f} MB/s")
        print(f"writer: {res['writer']['rows_per_s'] / 1e6:.2f} M rows/s, {res['writer']['mb_s']:.0f} MB/s per rank")
        for k in ("training_loop", "training_loop_long_steps"):
            t = res[k]
            print(f"{k}: {t['step_ms_off']:.1f} ms steps, {t['slowdown_pct']:+.2f}% with the writer on "
                  f"({t['overhead_ms_per_step']:+.2f} ms/step; target <= 1%)")
        print(f"reader: {res['reader']['join_rows_per_s'] / 1e6:.1f} M rows/s joined against "
              f"{res['reader']['stored_rows'] / 1e6:.0f} M stored rows (target >= 5 M/s)")
    print_bounded(res["bounded_reader"])
    print(f"wrote {out}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
