"""The teacher at real size on CPU ranks: a few real steps under ZeRO-3 + CPU optimizer offload, peak memory per rank
against the dry-run estimate (issue 15).

    python benchmarks/teacher_memory.py                        # 1b, 2 ranks, 4 steps: results/teacher_memory-<cpu>.json
    python benchmarks/teacher_memory.py --seven-b               # and then one step of 7b, if its estimate fits here
    python benchmarks/teacher_memory.py --preset tiny --steps 3 --out /tmp/tm.json     # checks the script (seconds)
    python benchmarks/teacher_memory.py --nvme /local/nvme --steps 8 --lr 1e-4          # optimizer states on disk

--nvme DIR runs zero3_offload.json with the optimizer on NVMe instead (ZeRO-Infinity: DeepSpeed's async_io op,
which needs libaio, e.g. `apt install libaio-dev`) and host-lean ZeRO-3 settings (NVME_SETTINGS): on this 24 GiB
box the 1b preset's 18 bytes of host model state per parameter (~19 GiB for 2 ranks, plus ~1 GiB per process)
do not fit with CPU offload, 6 of them on the host with NVMe do.

The real trainer (python -m recdistill.train.teacher under torchrun, gloo, TorchRec tables, DeepSpeed engine with
DeepSpeedCPUAdam) on the synthetic world, with the history cut to --history events so a 1b step takes seconds
rather than minutes: the dense parameters are the preset's, only LONGER's input is shorter. A thread samples the
resident set size (psutil) of every rank process every 0.2 s; the estimate is the dry run's for the same settings
on this machine: DeepSpeed's model-state estimate with its GPU and host parts both in host memory (the host part
split over the node's ranks), activations with the reference attention (what runs on CPU), the embedding tables
of the fullest rank; what a Python process with torch, TorchRec and DeepSpeed loaded holds before any model
(~0.5-1 GiB) is not in it. Target (issue 15): peak RSS within 1.5x of the estimate.
The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import mean

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import cpu_name, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


class RankRSS:
    """Peak RSS of each rank process under torchrun's `pid` (told apart by their RANK variable), sampled on a thread."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.root, self.every, self.peak = psutil.Process(pid), every, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                # the ranks are torchrun's own children; deeper ones (a JIT compiler, loader workers) are not counted
                for p in self.root.children(recursive=False):
                    rank = p.environ().get("RANK")
                    if rank is not None:
                        self.peak[int(rank)] = max(self.peak.get(int(rank), 0), p.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
            self._stop.wait(self.every)

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join()
        return dict(sorted(self.peak.items()))


#: ZeRO-3 settings of the --nvme runs that bound host memory: optimizer sub-groups (and so each rank's swap buffers,
#: buffer_count x sub_group_size fp32) of 1e8 elements instead of 1e9, at most 1e8 gathered parameters live
NVME_SETTINGS = {"sub_group_size": 100_000_000, "stage3_max_live_parameters": 100_000_000,
                 "stage3_max_reuse_distance": 100_000_000, "stage3_prefetch_bucket_size": 20_000_000,
                 "reduce_bucket_size": 20_000_000}


def nvme_config(base: str, nvme_dir: str, out: Path) -> Path:
    """`base` (a ZeRO-3 offload config) with the optimizer offloaded to `nvme_dir` and NVME_SETTINGS, written to
    `out`; the parameters stay offloaded to host memory (what offload_param says in `base`)."""
    ds = json.loads((ROOT / base).read_text())
    z = ds["zero_optimization"]
    z.update(NVME_SETTINGS)
    z["offload_optimizer"] = {"device": "nvme", "nvme_path": str(nvme_dir), "pin_memory": False, "buffer_count": 4}
    out.write_text(json.dumps(ds, indent=1))
    return out


def settings(a: argparse.Namespace, preset: str, steps: int) -> list[str]:
    """The config overrides of one run: the preset with the history cut, batch, steps, DeepSpeed config, precision;
    a day holds a few times the steps' samples so the pass never ends before `steps`, and the eval day is small."""
    per_day = max(64, 4 * a.ranks * a.batch * steps)
    return [f"teacher.preset={preset}", f"teacher.history_len={a.history}", f"data.history_len={a.history}",
            f"data.batch_size={a.batch}", f"teacher.steps={steps}", f"teacher.deepspeed={a.deepspeed}",
            f"teacher.precision={a.precision}", f"teacher.lr={a.lr}", "data.num_days=2",
            f"data.samples_per_day={per_day}",
            "teacher.log_every=1", "tracking.mode=disabled", "tracking.progress=false", "signals.window_steps=2"]


def estimate(sets: list[str], ranks: int) -> dict:
    """The dry-run estimate of one rank's memory on CPU for these settings (see the module docstring)."""
    from recdistill.config import load_config
    from recdistill.data.world import SyntheticWorld
    from recdistill.train.dryrun import dry_run

    cfg = load_config(None, sets)
    r = dry_run(cfg, SyntheticWorld(cfg.data).schema, world_size=ranks, gpu_mem_gib=1e6, fused_attention=False)
    f = r["fit"]
    states = f["model_states"]["gpu_gib"] + f["model_states"]["cpu_gib"] / ranks
    acts = f["activations"][f["checkpointing"]]["gib"]
    return {"dense_params": r["dense_params"], "embedding_params": r["embedding_params"],
            "model_states_gib": states, "activations_gib": acts, "embeddings_gib": f["embedding_gib_max_rank"],
            "total_gib": states + acts + f["embedding_gib_max_rank"], "zero_stage": f["zero_stage"],
            "gflops_per_sample": r["gflops_per_sample"], "nvme_gib": f["model_states"].get("nvme_gib", 0.0)}


def run(a: argparse.Namespace, preset: str, steps: int, work: Path) -> dict:
    """One torchrun of the real trainer; its peak RSS per rank, losses and step times (rank 0's log), signals."""
    sets = settings(a, preset, steps) + [f"signals.uri={work}/{preset}-sig", f"tracking.run_dir={work}/runs"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.ranks}",
           "-m", "recdistill.train.teacher", "--summary", str(work / f"{preset}-sum"),
           *[x for s in sets for x in ("--set", s)]]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(a.threads)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rss = RankRSS(proc.pid)
    log = proc.communicate(timeout=a.timeout)[0]
    peaks = rss.stop()
    if proc.returncode:
        raise SystemExit(f"{preset}: trainer exited {proc.returncode}:\n{log[-4000:]}")
    points = [dict(re.findall(r"(\S+) ([-+0-9.e]+|nan|inf)", m)) for m in
              re.findall(r"teacher step \d+: (.*)", log)]
    losses = [float(p["train/loss"]) for p in points]
    step_s = [a.ranks * a.batch / float(p["throughput/samples_per_s"]) for p in points]
    sums = [json.loads((work / f"{preset}-sum.rank{r}.json").read_text()) for r in range(a.ranks)]
    from recdistill.signals.reader import SignalReader

    rows = SignalReader(str(work / f"{preset}-sig")).stats.rows
    est = estimate(sets, a.ranks)
    peak = max(peaks.values()) / GIB if peaks else float("nan")
    return {"preset": preset, "settings": sets, "wall_s": time.perf_counter() - t0,
            "peak_rss_gib_per_rank": {r: v / GIB for r, v in peaks.items()}, "estimate": est,
            "peak_over_estimate": peak / est["total_gib"], "within_1_5x": peak <= 1.5 * est["total_gib"],
            "losses": losses, "loss_finite": all(x == x and abs(x) != float("inf") for x in losses),
            # a few 16-sample steps are noisy: the second half's mean against the first half's
            "loss_falling": len(losses) > 1 and mean(losses[len(losses) // 2:]) < mean(losses[:len(losses) // 2]),
            "step_s": step_s,
            "step_s_after_first": sum(step_s[1:]) / max(1, len(step_s) - 1),
            "signal_rows": rows, "trained_samples": sum(s["trained_samples"] for s in sums)}


def seven_b_fits(a: argparse.Namespace) -> tuple[bool, dict]:
    """Whether one 7b step's estimate fits the memory available now (with 25% to spare), and the figures."""
    est = estimate(settings(a, "7b", 1), a.ranks)
    avail = psutil.virtual_memory().available / GIB
    return est["total_gib"] * a.ranks * 1.25 <= avail, {"estimate": est, "available_gib": avail}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="1b", help="teacher preset (tiny / small to check the script)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--history", type=int, default=256, help="history events per sample (cut so a step takes seconds)")
    p.add_argument("--batch", type=int, default=8, help="samples per rank per step")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    p.add_argument("--deepspeed", default="configs/deepspeed/zero3_offload.json")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--lr", type=float, default=1e-4, help="dense Adam lr (the demo's 1e-3 diverges at 1b)")
    p.add_argument("--nvme", default=None, metavar="DIR",
                   help="optimizer states on NVMe under DIR (ZeRO-Infinity) instead of host memory")
    p.add_argument("--seven-b", action="store_true", help="then one step of 7b, if its estimate fits this machine")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/teacher_memory-<cpu>.json)")
    a = p.parse_args(argv)
    import deepspeed
    import torch
    import torchrec

    res = {"bench": "teacher_memory", "device": cpu_name(), "cpus": os.cpu_count(),
           "memory_gib": psutil.virtual_memory().total / GIB,
           "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                        "torchrec": torchrec.__version__, "python": sys.version.split()[0]},
           "command": " ".join(["python benchmarks/teacher_memory.py", *(sys.argv[1:] if argv is None else argv)]),
           "runs": []}
    with tempfile.TemporaryDirectory(prefix="teacher_memory-") as tmp:
        if a.nvme:
            Path(a.nvme).mkdir(parents=True, exist_ok=True)
            a.deepspeed = str(nvme_config(a.deepspeed, a.nvme, Path(tmp) / "zero3_nvme.json"))
            res["deepspeed_config"] = json.loads(Path(a.deepspeed).read_text())
        res["runs"].append(run(a, a.preset, a.steps, Path(tmp)))
        if a.seven_b:
            fits, why = seven_b_fits(a)
            res["seven_b"] = {"ran": fits, **why}
            if fits:
                res["runs"].append(run(a, "7b", 1, Path(tmp)))
    path = write_result("teacher_memory", res, quick=a.preset not in ("1b", "7b"), out=a.out)
    print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
