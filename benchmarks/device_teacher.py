"""One teacher run on one rank with throughput, peak memory and MFU: what launch/device_teacher.sh measures on a GPU.

    python benchmarks/device_teacher.py --preset 1b --steps 20                                    # bf16 on cuda:0
    python benchmarks/device_teacher.py --preset 7b --steps 3 --deepspeed configs/deepspeed/zero3_offload.json
    python benchmarks/device_teacher.py --preset tiny --steps 2 --out /tmp/dt.json                # CPU check

The real trainer in this process (recdistill.train.teacher.main: one-rank group, DeepSpeed engine), with
`teacher.embedding_backend=torch` (plain PyTorch tables: the GPU host has no TorchRec CUDA kernels, DESIGN §5).
steps/s and samples/s come from rank 0's step log, leaving out the first step (allocation, kernel compilation);
peak memory is torch.cuda.max_memory_allocated on CUDA, the process's peak RSS on CPU. MFU = dry-run forward FLOPs
per sample x 3 (forward + backward; activation checkpointing's recomputation is not counted as useful work) x
samples/s, over a bf16 matmul rate measured here and now (8192^3 on CUDA, 1024^3 on CPU). The last line of
output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import cpu_name  # noqa: E402


def matmul_tflops(device: torch.device, n: int, repeats: int = 10) -> float:
    """Measured bf16 matmul rate (TFLOP/s) of an n x n x n product."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="1b")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=None, help="samples per step (default: the config's)")
    p.add_argument("--history", type=int, default=None, help="history events (default: the preset's)")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed config (default: the preset's)")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--out", required=True, help="result JSON")
    a = p.parse_args(argv)
    from recdistill.config import load_config
    from recdistill.data.world import SyntheticWorld
    from recdistill.train.dryrun import dry_run
    from recdistill.train.teacher import main as train

    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="device_teacher-"))
    sets = [f"teacher.preset={a.preset}", "teacher.embedding_backend=torch", f"teacher.precision={a.precision}",
            f"teacher.steps={a.steps}", "teacher.log_every=1", "tracking.mode=disabled", "tracking.progress=false",
            "data.num_days=2", f"signals.uri={work}/sig", f"tracking.run_dir={work}/runs"]
    sets += [f"data.batch_size={a.batch}"] * bool(a.batch) + [f"teacher.deepspeed={a.deepspeed}"] * bool(a.deepspeed)
    sets += [f"teacher.history_len={a.history}", f"data.history_len={a.history}"] if a.history else []
    cfg = load_config(None, sets)
    batch = cfg.data.batch_size
    # a training day a few times the steps' samples (the teacher's sampled view keeps a fraction), and an eval day as
    # small, so the run is the steps and not a pass over 20K samples a day
    sets.append(f"data.samples_per_day={4 * batch * a.steps}")
    report = dry_run(cfg, SyntheticWorld(cfg.data).schema, world_size=1)
    rate = matmul_tflops(torch.device("cuda" if cuda else "cpu"), 8192 if cuda else 1024)

    import contextlib
    import io

    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        rc = train([a for s in sets for a in ("--set", s)] + ["--summary", str(work / "sum")])
    wall = time.perf_counter() - t0
    print(log.getvalue()[-3000:], file=sys.stderr)
    points = [dict(re.findall(r"(\S+) ([-+0-9.e]+|nan|inf)", m)) for m in re.findall(r"teacher step \d+: (.*)",
                                                                                      log.getvalue())]
    rates = [float(x["throughput/samples_per_s"]) for x in points[1:]] or [float("nan")]
    samples_s = len(rates) / sum(1 / r for r in rates)  # harmonic mean: samples over total time
    flops = 3 * report["gflops_per_sample"] * 1e9 * samples_s / 1e12
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    res = {"bench": "device_teacher", "preset": a.preset, "rc": rc,
           "device": torch.cuda.get_device_name(0) if cuda else cpu_name(),
           "versions": {"torch": torch.__version__, "python": platform.python_version()},
           "command": " ".join(["python benchmarks/device_teacher.py", *(sys.argv[1:] if argv is None else argv)]),
           "settings": sets, "dense_params": report["dense_params"], "gflops_per_sample": report["gflops_per_sample"],
           "steps": len(points), "wall_s": wall, "samples_per_s": samples_s, "steps_per_s": samples_s / batch,
           "losses": [float(x["train/loss"]) for x in points], "peak_memory_gib": peak,
           "bf16_matmul_tflops": rate, "model_tflops": flops, "mfu": flops / rate}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res))
    return rc


if __name__ == "__main__":
    sys.exit(main())
