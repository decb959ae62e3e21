"""Stream layer throughput and join latency (issue 17 targets), on this machine.

    python benchmarks/streams_bench.py            # about two minutes; writes benchmarks/results/streams-<cpu>.json
    python benchmarks/streams_bench.py --quick    # smaller, a smoke run (writes ...-quick.json)
    python benchmarks/streams_bench.py --only latency   # one part again, merged into the existing result file

1. joiner rows/s on one core (the process pinned to one CPU, Arrow's pool at one thread): the join core alone on
   batches in memory, and end to end on the local backend (poll two local streams, join, append the joined stream);
   target >= 1M joined rows/s. The end-to-end run goes once to a directory of the local disk and once to fsspec's
   memory:// file system, to tell the file system's share from the stream code's. Also per CPU-second of the
   process, which a machine shared with other work deflates less than wall-clock rows/s (the result records the
   load average either way). Inputs: 5% of samples re-delivered, 10% without a signal, signals shuffled and up to
   half a batch behind their samples.
2. redis append and consume (poll + commit) rows/s on loopback against a private redis-server (AOF on, everysec),
   entries of `--entry-rows` rows; target >= 200K rows/s each.
3. join latency in real time: samples produced at `--rate` rows/s with event time = wall clock, each signal sent
   after a random delay of 0..1.5 x max_delay (so about a third expire), the joiner polling every `--poll-ms`;
   p50/p99 of (emit time - event time) for joined rows and for all rows; target p99 <= max_delay + one poll interval.
   Event times are the wall clock here (a live stream), so the joiner runs with its clock watermark
   (`stream.clock_watermark`); the same run without it (`latency_data_watermark`) shows what the data watermark's
   lag behind the clock (producer ticks, listing, the poll itself) adds.
The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import redis
from _common import cpu_name, write_result  # benchmarks/ is sys.path[0] when run as a script

from recdistill.streams.base import version_column
from recdistill.streams.joiner import JoinCore, Joiner
from recdistill.streams.local import LocalStream
from recdistill.streams.redis import RedisStream
from recdistill.streams.server import RedisServer

TASKS = ("ctr", "cvr", "watch_time")
PRODUCER_TICK_S = 0.01  # latency run: the sample producer appends this often (adds up to a tick to the latency)


def samples(ids: np.ndarray, times: np.ndarray) -> pa.Table:
    """Sample-stream rows: keys, day, traffic, one label per task."""
    n = len(ids)
    cols = {"sample_id": ids, "event_time_ms": times, "seq": ids, "day": np.zeros(n, np.int32),
            "traffic": (ids % 2).astype(np.int32)}
    cols.update({f"label_{t}": ((ids * (k + 3)) % 7 == 0).astype(np.float32) for k, t in enumerate(TASKS)})
    return pa.table(cols)


def signals(ids: np.ndarray, times: np.ndarray) -> pa.Table:
    """Teacher-signal rows for ids, logits derived from the id."""
    flat = pa.array(np.repeat(ids.astype(np.float32) * 1e-6, len(TASKS)))
    return pa.table({"sample_id": ids, "event_time_ms": times, "seq": ids,
                     "logits": pa.FixedSizeListArray.from_arrays(flat, len(TASKS)),
                     "teacher_step": np.full(len(ids), 1, np.int64),
                     "teacher_version": version_column("bench", len(ids))})


def join_inputs(n: int, batch: int, seed: int = 0) -> list[tuple[pa.Table, pa.Table, int]]:
    """(samples, signals, watermark) per step: 1 ms of event time per id, duplicates, missing and shuffled signals."""
    rng = np.random.default_rng(seed)
    has = rng.random(n) >= 0.1
    steps = []
    for lo in range(0, n, batch):
        ids = np.arange(lo, min(n, lo + batch), dtype=np.int64)
        dup = rng.choice(ids, len(ids) // 20, replace=False)
        s_ids = np.concatenate([ids, dup])
        g_ids = np.arange(max(0, lo - batch // 2), min(n, lo + batch // 2), dtype=np.int64)
        g_ids = rng.permutation(g_ids[has[g_ids]])
        steps.append((samples(s_ids, s_ids), signals(g_ids, g_ids), int(ids[-1])))
    return steps


def pin_one_core() -> int:
    """Pin this process to one CPU and Arrow to one thread; returns the CPU."""
    cpu = sorted(os.sched_getaffinity(0))[-1]
    os.sched_setaffinity(0, {cpu})
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    return cpu


def bench_join_core(n: int, batch: int, max_delay_ms: int) -> dict:
    """The JoinCore alone over batches already in memory."""
    steps = join_inputs(n, batch)
    core = JoinCore(len(TASKS), max_delay_ms)
    t0, c0 = time.perf_counter(), time.process_time()
    out_rows = 0
    for s, g, wm in steps:
        out = core.step(s, g, wm, now_ms=wm)
        out_rows += 0 if out is None else out.num_rows
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    c = core.counts
    return {"samples": n, "batch_rows": batch, "seconds": dt, "cpu_seconds": cpu, "rows_out": out_rows,
            "joined_rows_per_s": c.joined / dt, "joined_rows_per_cpu_s": c.joined / cpu,
            "samples_in_per_s": c.samples_in / dt, "joined": c.joined, "expired": c.expired,
            "duplicates": c.duplicate_samples}


def bench_join_local(n: int, batch: int, max_delay_ms: int, root: str) -> dict:
    """The Joiner end to end on the local backend: write both inputs (timed apart), then join until drained."""
    s_in, g_in, out = (LocalStream(root, name) for name in ("samples", "signals", "joined"))
    t0 = time.perf_counter()
    for s, g, _ in join_inputs(n, batch):
        s_in.append(s)
        g_in.append(g)
    t_write = time.perf_counter() - t0
    j = Joiner(LocalStream(root, "samples"), LocalStream(root, "signals"), out, num_tasks=len(TASKS),
               max_delay_ms=max_delay_ms, poll_rows=batch, clock=lambda: 0)
    t0, c0 = time.perf_counter(), time.process_time()
    j.drain()
    j.flush(2**62)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    c = j.core.counts
    return {"samples": n, "batch_rows": batch, "seconds": dt, "cpu_seconds": cpu, "write_seconds": t_write,
            "joined_rows_per_s": c.joined / dt, "joined_rows_per_cpu_s": c.joined / cpu,
            "rows_out_per_s": j.rows_out / dt,
            "joined": c.joined, "expired": c.expired, "rows_out": j.rows_out}


def bench_redis(n: int, batch: int, entry_rows: int) -> dict:
    """Append then consume n rows through a private redis-server on loopback."""
    with RedisServer() as server:
        prod = RedisStream(server.url, "bench", entry_rows=entry_rows)
        data = [samples(ids, ids) for ids in np.array_split(np.arange(n, dtype=np.int64), max(1, n // batch))]
        t0 = time.perf_counter()
        for table in data:
            prod.append(table)
        t_append = time.perf_counter() - t0
        cons = RedisStream(server.url, "bench", entry_rows=entry_rows, consumer="bench")
        got, t0 = 0, time.perf_counter()
        while got < n:
            t, cur = cons.poll(batch)
            if t is None:
                break
            got += t.num_rows
            cons.commit(cur)
        t_consume = time.perf_counter() - t0
        info = redis.Redis.from_url(server.url).info("server")
        aof = os.path.getsize(os.path.join(server.dir, "appendonly.aof"))
    return {"rows": n, "batch_rows": batch, "entry_rows": entry_rows, "append_rows_per_s": n / t_append,
            "consume_rows_per_s": got / t_consume, "consumed": got, "aof_bytes": aof,
            "redis_version": info.get("redis_version")}


def bench_latency(seconds: float, rate: int, max_delay_ms: int, poll_ms: int, root: str,
                  clock_watermark: bool = True) -> dict:
    """Real-time joins on the local backend: wall-clock event times, random signal delays, a polling joiner."""
    s_st, g_st = LocalStream(root, "lat-samples"), LocalStream(root, "lat-signals")
    j = Joiner(LocalStream(root, "lat-samples"), LocalStream(root, "lat-signals"), LocalStream(root, "lat-out"),
               num_tasks=len(TASKS), max_delay_ms=max_delay_ms, poll_rows=1 << 20, clock_watermark=clock_watermark)
    load0 = os.getloadavg()
    stop, rng = threading.Event(), np.random.default_rng(1)

    def produce():
        pending: list[tuple[float, np.ndarray, np.ndarray]] = []  # (send at, ids, event times) of signals
        next_id, tick = 0, PRODUCER_TICK_S
        while not stop.is_set():
            now = time.time()
            k = int(rate * tick)
            ids = np.arange(next_id, next_id + k, dtype=np.int64)
            times = np.full(k, int(now * 1000), np.int64)
            next_id += k
            s_st.append(samples(ids, times))
            delay = rng.uniform(0, 1.5 * max_delay_ms / 1000, k)
            for d in np.unique(np.round(delay, 2)):
                sel = np.round(delay, 2) == d
                pending.append((now + d, ids[sel], times[sel]))
            due = [p for p in pending if p[0] <= now]
            pending = [p for p in pending if p[0] > now]
            if due:
                g_ids = np.concatenate([d[1] for d in due])
                g_st.append(signals(g_ids, np.concatenate([d[2] for d in due])))
            time.sleep(max(0.0, tick - (time.time() - now)))

    th = threading.Thread(target=produce, daemon=True)
    th.start()
    t_end = time.monotonic() + seconds
    starts, next_step = [], time.monotonic()
    while time.monotonic() < t_end:  # a step every poll interval (fixed rate); the step itself never waits
        starts.append(time.monotonic())
        j.step()
        next_step += poll_ms / 1000
        time.sleep(max(0.0, next_step - time.monotonic()))
    stop.set()
    th.join()
    m = j.metrics()
    target = max_delay_ms + poll_ms
    return {"seconds": seconds, "rate_rows_per_s": rate, "max_delay_ms": max_delay_ms, "poll_ms": poll_ms,
            "producer_tick_ms": PRODUCER_TICK_S * 1000, "clock_watermark": clock_watermark,
            "load_avg_start": load0, "load_avg_end": os.getloadavg(), "when": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                             time.gmtime()),
            "joined": m["join/joined"], "expired": m["join/expired"], "late": m["join/late"],
            "latency_p50_ms": m["join/latency_p50_ms"], "latency_p99_ms": m["join/latency_p99_ms"],
            "emit_latency_p99_ms": m["join/emit_latency_p99_ms"], "target_p99_ms": target,
            # the joiner's real poll interval: a loaded machine stretches it, and the latency with it
            "step_period_p50_ms": float(np.percentile(np.diff(starts) * 1000, 50)),
            "step_period_p99_ms": float(np.percentile(np.diff(starts) * 1000, 99)),
            "p99_within_target": (m["join/emit_latency_p99_ms"] or 0) <= target}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    ap.add_argument("--batch", type=int, default=65536, help="rows per append / poll")
    ap.add_argument("--entry-rows", type=int, default=16384, help="rows per redis entry")
    ap.add_argument("--rate", type=int, default=50_000, help="latency run: samples per second")
    ap.add_argument("--poll-ms", type=int, default=50, help="latency run: joiner poll interval")
    ap.add_argument("--out", default=None, help="result JSON path (default benchmarks/results/streams-<cpu>.json)")
    ap.add_argument("--only", choices=["redis", "latency", "join"], action="append",
                    help="run only these parts (repeatable) and merge them into the existing result file; each part "
                    "records when it ran and the load average around it")
    args = ap.parse_args()
    if args.only:
        return run_parts(args)
    n_join, n_redis, lat_s = (300_000, 200_000, 2.0) if args.quick else (4_000_000, 2_000_000, 10.0)
    res = {"bench": "streams", "quick": args.quick, "cpu": cpu_name(), "cpus_visible": len(os.sched_getaffinity(0)),
           "python": platform.python_version(), "pyarrow": pa.__version__, "numpy": np.__version__,
           "redis_py": redis.__version__, "load_avg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        res["redis"] = bench_redis(n_redis, args.batch, args.entry_rows)  # before pinning: the client is not the joiner
        res["latency"] = bench_latency(lat_s, args.rate, 500, args.poll_ms, os.path.join(tmp, "lat"))
        res["pinned_cpu"] = pin_one_core()
        res["join_core"] = bench_join_core(n_join, args.batch, max_delay_ms=args.batch)
        res["join_local"] = bench_join_local(n_join, args.batch, args.batch, os.path.join(tmp, "join"))
        # the same on fsspec's in-memory file system: the stream code's cost without the disk's
        res["join_local_memfs"] = bench_join_local(n_join, args.batch, args.batch, "memory://streams-bench")
    res["load_avg_end"] = os.getloadavg()
    res["targets"] = {"joined_rows_per_s_one_core": 1_000_000, "redis_append_rows_per_s": 200_000,
                      "redis_consume_rows_per_s": 200_000}
    path = write_result("streams", res, args.quick, args.out)
    summary = {"joiner_core_rows_per_s": round(res["join_core"]["joined_rows_per_s"]),
               "joiner_core_rows_per_cpu_s": round(res["join_core"]["joined_rows_per_cpu_s"]),
               "joiner_local_rows_per_s": round(res["join_local"]["joined_rows_per_s"]),
               "joiner_local_rows_per_cpu_s": round(res["join_local"]["joined_rows_per_cpu_s"]),
               "joiner_local_memfs_rows_per_s": round(res["join_local_memfs"]["joined_rows_per_s"]),
               "redis_append_rows_per_s": round(res["redis"]["append_rows_per_s"]),
               "redis_consume_rows_per_s": round(res["redis"]["consume_rows_per_s"]),
               "join_latency_p50_ms": res["latency"]["latency_p50_ms"],
               "join_latency_p99_ms": res["latency"]["latency_p99_ms"],
               "emit_latency_p99_ms": res["latency"]["emit_latency_p99_ms"],
               "load_avg": res["load_avg_end"][0], "result": str(path)}
    print(json.dumps(summary))


def run_parts(args: argparse.Namespace) -> None:
    """--only: the chosen parts again, written over their entries in the existing result file (a part run on a busier
    machine than the rest is marked by its own load average)."""
    from _common import result_path

    n_join, n_redis, lat_s = (300_000, 200_000, 2.0) if args.quick else (4_000_000, 2_000_000, 10.0)
    path = args.out or str(result_path("streams", args.quick))
    res = json.loads(open(path).read()) if os.path.exists(path) else {"bench": "streams"}
    with tempfile.TemporaryDirectory() as tmp:
        if "redis" in args.only:
            res["redis"] = {**bench_redis(n_redis, args.batch, args.entry_rows), "load_avg_end": os.getloadavg()}
        if "latency" in args.only:
            res["latency"] = bench_latency(lat_s, args.rate, 500, args.poll_ms, os.path.join(tmp, "lat"))
            res["latency_data_watermark"] = bench_latency(lat_s, args.rate, 500, args.poll_ms,
                                                          os.path.join(tmp, "lat0"), clock_watermark=False)
        if "join" in args.only:
            res["pinned_cpu"] = pin_one_core()
            res["join_core"] = bench_join_core(n_join, args.batch, max_delay_ms=args.batch)
            res["join_local"] = bench_join_local(n_join, args.batch, args.batch, os.path.join(tmp, "join"))
            res["join_local_memfs"] = bench_join_local(n_join, args.batch, args.batch, "memory://streams-bench")
    res["parts_rerun"] = sorted(set(res.get("parts_rerun", [])) | set(args.only))
    out = write_result("streams", res, args.quick, path)
    summary = {part: {k: v for k, v in res[part].items() if k.endswith(("_per_s", "_ms", "target"))}
               for part in ("latency", "latency_data_watermark", "redis", "join_local") if part in res
               and (part.split("_")[0] in args.only or part == "latency_data_watermark" and "latency" in args.only)}
    print(json.dumps({**summary, "result": str(out)}))


if __name__ == "__main__":
    main()
