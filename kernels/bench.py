"""Microbenchmarks of the kernels against their baselines, forward and forward+backward, in one run.

    python -m kernels.bench                       # GPU: every op at LONGER / TokenMixer-like shapes, bf16
    python -m kernels.bench --op compressed_attention --dtype bf16
    python -m kernels.bench --quick               # tiny shapes; on CPU: baselines only (smoke test of the script)

Writes <out>/<device>-<date>.json and .png (out: kernels/results on a GPU, /tmp/kernels-bench on CPU so that CPU
smoke numbers are never mistaken for results) and prints one JSON summary as the last line of stdout.
Per op, shape and implementation: ms (median), TFLOP/s of useful FLOPs, GB/s of the minimal HBM traffic.
Baselines: eager reference, torch.compile(reference); attention also SDPA (flash: padded, *no mask* since the
flash backend takes none, a lower bound on its cost; efficient: padded with a boolean mask) and FlexAttention
(packed jagged keys, document + per-query causal-limit BlockMask). The attention baselines get the history already
merged (their merge is not timed); "triton" merges inside its K/V loads from the raw events, "triton_premerged"
takes the same merged input as the baselines. A bf16 dense matmul rate is measured for "% of peak".
On CPU the Triton rows are skipped with a reason (interpreter timings mean nothing).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kernels.compressed_attention import compressed_attention, compressed_attention_reference, merge_mean
from kernels.token_mixer import token_mixer, token_mixer_reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# LONGER-like: histories lognormal with mean ~2K events, capped at 20K, merged by 8; TokenMixer-like: F = 2D..4D.
ATTN_SHAPES = [dict(B=256, Nq=128, H=8, d=64, mean=2048, max=20480, K=8),
               dict(B=512, Nq=64, H=4, d=128, mean=2048, max=20480, K=8),
               dict(B=1024, Nq=256, H=8, d=64, mean=2048, max=20480, K=8)]
MIXER_SHAPES = [dict(B=2048, T=16, D=1024, F=2048), dict(B=4096, T=32, D=512, F=2048),
                dict(B=1024, T=64, D=256, F=1024)]
QUICK_ATTN = [dict(B=4, Nq=8, H=2, d=16, mean=48, max=160, K=4)]
QUICK_MIXER = [dict(B=8, T=4, D=32, F=64)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() (CUDA events on a GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def fwd_bwd(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    """A closure running fn forward and backward (upstream gradient of ones, fixed)."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    grad = torch.ones_like(fn(*leaves))

    def run() -> None:
        for x in leaves:
            x.grad = None
        fn(*leaves).backward(grad)

    return run


def matmul_rate(device: torch.device, quick: bool) -> dict:
    """Achievable dense bf16 matmul TFLOP/s on this device (the "peak" the kernels are compared with)."""
    n = 512 if device.type == "cpu" else (4096 if quick else 8192)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = timeit(lambda: a @ b, device, reps=5 if device.type == "cpu" else 50)
    return {"n": n, "ms": ms, "tflops": 2 * n**3 / ms / 1e9}


# ------------------------------------------------------------------------------------------- compressed attention


def attention_inputs(s: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Raw event K/V (jagged), queries, event offsets, q_limit (global queries see all, recent ones are causal)."""
    g = torch.Generator().manual_seed(seed)
    sigma = 0.8  # lognormal spread; mu set so that the mean is s["mean"]
    mu = math.log(s["mean"]) - sigma**2 / 2
    events = torch.distributions.LogNormal(mu, sigma).sample((s["B"],)).round().clamp(1, s["max"]).long()
    events[0] = s["max"]  # one row at the cap, as in real traffic
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), events.cumsum(0)])
    n, h, d = int(offsets[-1]), s["H"], s["d"]
    q = torch.randn(s["B"], s["Nq"], h, d, generator=g).to(device, dtype)
    k = torch.randn(n, h, d, generator=g).to(device, dtype)
    v = torch.randn(n, h, d, generator=g).to(device, dtype)
    merged = (events + s["K"] - 1) // s["K"]
    n_global = s["Nq"] // 4
    recent = s["Nq"] - n_global
    # recent query i (0 = oldest) is merged position L - recent + i: it sees positions <= it
    pos = merged[:, None] - recent + torch.arange(recent)[None, :] + 1
    q_limit = torch.cat([torch.full((s["B"], n_global), -1), pos.clamp(min=0)], 1)
    return dict(q=q, k=k, v=v, offsets=offsets.to(device), q_limit=q_limit.to(device), events=events,
                merged=merged, visible=torch.where(q_limit < 0, merged[:, None], q_limit.clamp(max=merged[:, None])))


def attention_impls(x: dict, device: torch.device, dtype: torch.dtype) -> dict[str, tuple[Callable, list]]:
    """name -> (fn(*tensors) -> output, tensors). Merged/padded inputs for the baselines are built here, untimed."""
    off, lim, kf = x["offsets"], x["q_limit"], x["K"]
    km, m_off = merge_mean(x["k"], off, kf)
    vm, _ = merge_mean(x["v"], off, kf)
    impls = {
        "triton": (lambda q, k, v: compressed_attention(q, k, v, off, lim, merge_k=kf, backend="triton"),
                   [x["q"], x["k"], x["v"]]),
        "triton_premerged": (lambda q, k, v: compressed_attention(q, k, v, m_off, lim, backend="triton"),
                             [x["q"], km, vm]),
        "reference": (lambda q, k, v: compressed_attention_reference(q, k, v, off, lim, merge_k=kf),
                      [x["q"], x["k"], x["v"]]),
    }
    compiled_ref = torch.compile(compressed_attention_reference)
    impls["compile_reference"] = (lambda q, k, v: compiled_ref(q, k, v, off, lim, None, kf), [x["q"], x["k"], x["v"]])

    # padded [B, H, L, d] keys and a [B, 1, Nq, L] visibility mask for SDPA
    b, nq, h, d = x["q"].shape
    lmax = int(x["merged"].max())
    idx = (m_off[:-1, None] + torch.arange(lmax, device=device)).clamp(max=km.shape[0] - 1)
    kp, vp = km[idx].transpose(1, 2).contiguous(), vm[idx].transpose(1, 2).contiguous()
    qp = x["q"].transpose(1, 2).contiguous()
    mask = (torch.arange(lmax, device=device)[None, None, :] < x["visible"].to(device)[:, :, None]).unsqueeze(1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION if device.type == "cuda" else SDPBackend.MATH):
            return sdpa(q, k, v)

    def sdpa_efficient(q, k, v):
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION if device.type == "cuda" else SDPBackend.MATH):
            return sdpa(q, k, v, attn_mask=mask)

    impls["sdpa_flash_nomask"] = (sdpa_flash, [qp, kp, vp])
    impls["sdpa_efficient_mask"] = (sdpa_efficient, [qp, kp, vp])
    impls["flex"] = flex_impl(x, km, vm, m_off, device)
    return impls


def flex_impl(x: dict, km: torch.Tensor, vm: torch.Tensor, m_off: torch.Tensor, device: torch.device):
    """FlexAttention on packed jagged keys: one "document" per row, plus the per-query limit, as a BlockMask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, nq, h, d = x["q"].shape
    m_total = km.shape[0]
    doc_k = torch.repeat_interleave(torch.arange(b, device=device), x["merged"].to(device), output_size=m_total)
    doc_q = torch.arange(b * nq, device=device) // nq
    vis = x["visible"].to(device).reshape(-1)
    start = m_off[:-1]

    def mask_mod(bb, hh, q_idx, kv_idx):
        return (doc_q[q_idx] == doc_k[kv_idx]) & (kv_idx - start[doc_q[q_idx]] < vis[q_idx])

    block_mask = create_block_mask(mask_mod, 1, 1, b * nq, m_total, device=str(device))
    flex = torch.compile(flex_attention)
    qf = x["q"].reshape(1, b * nq, h, d).transpose(1, 2).contiguous()
    kf, vf = km.unsqueeze(0).transpose(1, 2).contiguous(), vm.unsqueeze(0).transpose(1, 2).contiguous()
    return (lambda q, k, v: flex(q, k, v, block_mask=block_mask)), [qf, kf, vf]


def attention_cost(x: dict, esize: int) -> tuple[float, float, float, float]:
    """Useful FLOPs (QK^T and PV over visible pairs; backward = 2x forward, recomputation not counted) and minimal
    bytes (forward: q, o, raw k, v; backward: q, o, dO, dq, raw k, v, dk, dv), for forward and forward+backward."""
    h, d = x["q"].shape[2], x["q"].shape[3]
    pairs = float(x["visible"].sum())
    fwd = 4 * pairs * h * d
    q_bytes = x["q"].numel() * esize
    kv_bytes = 2 * x["k"].numel() * esize
    return fwd, 3 * fwd, 2 * q_bytes + kv_bytes, 2 * q_bytes + kv_bytes + 4 * q_bytes + 2 * kv_bytes


# ------------------------------------------------------------------------------------------------- token mixer


def mixer_inputs(s: dict, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s["B"], s["T"], s["D"], generator=g)
    w_in = torch.randn(s["T"], s["D"], 2 * s["F"], generator=g) / s["D"] ** 0.5
    w_out = torch.randn(s["T"], s["F"], s["D"], generator=g) / s["F"] ** 0.5
    return [t.to(device, dtype) for t in (x, w_in, w_out)]


def mixer_impls() -> dict[str, Callable]:
    return {"triton": lambda *a: token_mixer(*a, backend="triton"), "reference": token_mixer_reference,
            "compile_reference": torch.compile(token_mixer_reference)}


def mixer_cost(s: dict, esize: int) -> tuple[float, float, float, float]:
    """FLOPs: 6 B T D F forward (gate+up and down GEMMs), 2x that backward (dx, dW_in, dW_out; the recomputed h is
    not counted). Bytes: x, y, weights forward; x, dy, dx, weights, weight grads backward."""
    b, t, d, f = s["B"], s["T"], s["D"], s["F"]
    fwd = 6.0 * b * t * d * f
    act, w = b * t * d * esize, 3 * t * d * f * esize
    return fwd, 3 * fwd, 2 * act + w, 2 * act + w + 3 * act + 2 * w


# --------------------------------------------------------------------------------------------------------- driver


def measure(name: str, fn: Callable, inputs: list, costs: tuple, device: torch.device, reps: int) -> dict:
    """ms / TFLOP/s / GB/s of fn forward and forward+backward; an error is recorded, not raised."""
    row: dict = {"impl": name}
    for mode, flops, nbytes, make in (("fwd", costs[0], costs[2], None), ("fwd_bwd", costs[1], costs[3], fwd_bwd)):
        try:
            if make is None:
                def run(fn=fn, inputs=inputs):
                    with torch.no_grad():
                        fn(*inputs)
            else:
                run = make(fn, inputs)
            ms = timeit(run, device, reps)
            row[mode] = {"ms": ms, "tflops": flops / ms / 1e9, "gbps": nbytes / ms / 1e6}
        except Exception as exc:  # noqa: BLE001 - OOM, unsupported backend, compile failure: record and go on
            row[mode] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def bench_op(op: str, shapes: list[dict], device: torch.device, dtype: torch.dtype, reps: int) -> list[dict]:
    esize = torch.empty((), dtype=dtype).element_size()
    out = []
    for s in shapes:
        if op == "compressed_attention":
            x = attention_inputs(s, device, dtype)
            x["K"] = s["K"]
            impls, costs = attention_impls(x, device, dtype), attention_cost(x, esize)
            info = {**s, "events_total": int(x["events"].sum()), "merged_max": int(x["merged"].max()),
                    "visible_pairs": int(x["visible"].sum())}
        else:
            inputs = mixer_inputs(s, device, dtype)
            impls, costs, info = {k: (f, inputs) for k, f in mixer_impls().items()}, mixer_cost(s, esize), dict(s)
        rows = []
        for name, (fn, inputs) in impls.items():
            if name.startswith("triton") and device.type != "cuda":
                rows.append({"impl": name, "skipped": "no CUDA: Triton would run in the interpreter, timings "
                                                      "would be meaningless"})
                continue
            rows.append(measure(name, fn, inputs, costs, device, reps))
            print(f"{op} {s} {name}: " + ", ".join(
                f"{m} {r['ms']:.3f} ms {r['tflops']:.2f} TF/s" if "ms" in r else f"{m} {r['error']}"
                for m, r in ((m, rows[-1][m]) for m in ("fwd", "fwd_bwd"))), flush=True)
        out.append({"op": op, "shape": info, "flops": {"fwd": costs[0], "fwd_bwd": costs[1]},
                    "bytes": {"fwd": costs[2], "fwd_bwd": costs[3]}, "results": rows})
    return out


def summarize(records: list[dict], peak: float) -> dict:
    """Speed-ups of Triton over each baseline (fwd+bwd) and Triton's % of the measured matmul rate, per shape."""
    out = []
    for rec in records:
        by = {r["impl"]: r.get("fwd_bwd", {}) for r in rec["results"]}
        tri = by.get("triton", {})
        entry = {"op": rec["op"], "shape": {k: rec["shape"][k] for k in rec["shape"] if len(k) <= 3}}
        if "ms" in tri:
            entry["triton_fwd_bwd_ms"] = tri["ms"]
            entry["pct_of_matmul_peak"] = 100 * tri["tflops"] / peak
            entry["speedup_vs"] = {k: v["ms"] / tri["ms"] for k, v in by.items() if k != "triton" and "ms" in v}
        out.append(entry)
    return {"per_shape": out}


def plot(records: list[dict], path: Path, title: str) -> str | None:
    """Bar chart of fwd+bwd ms per implementation, one panel per op and shape; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(records), figsize=(4.5 * len(records), 4), squeeze=False)
    for ax, rec in zip(axes[0], records, strict=True):
        rows = [r for r in rec["results"] if "fwd_bwd" in r]
        for i, mode in enumerate(("fwd", "fwd_bwd")):
            ms = [r[mode].get("ms", 0.0) for r in rows]
            ax.bar([j + 0.4 * i for j in range(len(rows))], ms, width=0.4, label=mode)
        ax.set_xticks([j + 0.2 for j in range(len(rows))], [r["impl"] for r in rows], rotation=60, ha="right",
                      fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title(f"{rec['op']}\n{ {k: v for k, v in rec['shape'].items() if len(k) <= 3} }", fontsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", choices=["all", "compressed_attention", "token_mixer"], default="all")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--out", default=None, help="output folder (default: kernels/results on GPU, /tmp on CPU)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = DTYPES[args.dtype]
    reps = 3 if device.type == "cpu" else (10 if args.quick else 30)
    ops = ["compressed_attention", "token_mixer"] if args.op == "all" else [args.op]
    records = []
    for op in ops:
        if op == "compressed_attention":
            shapes = QUICK_ATTN if args.quick else ATTN_SHAPES
        else:
            shapes = QUICK_MIXER if args.quick else MIXER_SHAPES
        records += bench_op(op, shapes, device, dtype, reps)
    peak = matmul_rate(device, args.quick)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = device_name(device)
    result = {"device": name, "device_type": device.type, "torch": torch.__version__, "triton": triton_version,
              "cuda": torch.version.cuda, "dtype": args.dtype, "quick": args.quick,
              "date": dt.datetime.now().isoformat(timespec="seconds"), "matmul_bf16": peak, "records": records}
    result["summary"] = summarize(records, peak["tflops"])
    out_dir = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results" if device.type == "cuda"
                                                else Path("/tmp/kernels-bench"))
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:40]
    stem = f"{slug}-{dt.date.today().isoformat()}{'-quick' if args.quick else ''}"
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=2))
    png = plot(records, out_dir / f"{stem}.png", f"{name}, {args.dtype}, torch {torch.__version__}")
    summary = {"device": name, "dtype": args.dtype, "json": str(json_path), "png": png,
               "matmul_bf16_tflops": peak["tflops"], **result["summary"]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
