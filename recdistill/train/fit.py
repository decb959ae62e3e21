"""Does a teacher fit per GPU? The memory half of `recdistill teacher --dry-run --gpu-mem-gib M` (issue 15).

    recdistill teacher --dry-run --config configs/teacher/24b.yaml --world-size 64 --gpu-mem-gib 80

Per GPU: DeepSpeed's model-state estimate for the ZeRO stage and offload of the preset's DeepSpeed config (its own
estimators, from parameter counts), activations (an analytic count of what autograd keeps per sample, times the
micro batch, with and without activation checkpointing, in the precision's bytes) and the embedding tables with
their RowWiseAdagrad state on the rank that holds the most under the sharding plan. Nothing is allocated: the
counts come from the config and a meta-device model.
"""

from __future__ import annotations

import math

GIB = 1024**3


def zero_stage(ds: dict) -> tuple[int, bool, bool]:
    """(ZeRO stage, optimizer offloaded, parameters offloaded) of a DeepSpeed config dict."""
    z = ds.get("zero_optimization", {})
    dev = lambda key: (z.get(key) or {}).get("device", "none") in ("cpu", "nvme")  # noqa: E731
    return int(z.get("stage", 0)), dev("offload_optimizer"), dev("offload_param")


def model_state_gib(ds: dict, dense_params: int, largest_layer: int, world_size: int) -> dict[str, float]:
    """DeepSpeed's own model-state estimate (GiB per GPU, GiB of host memory per node) for `ds`'s stage and
    offload, with one GPU per rank. Stage 1 has no estimator of its own in DeepSpeed: the stage-2 figure plus the
    gradients that stage 1 leaves whole on every rank (2 bytes each in bf16/fp16, the estimators' assumption).
    ZeRO-3 with the optimizer on NVMe has none either: see `_nvme_host_bytes`; 'nvme_gib' is then the disk part."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    stage, opt_off, param_off = zero_stage(ds)
    if stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(dense_params, largest_layer, world_size, 1,
                                                            cpu_offload=opt_off, cpu_offload_params=param_off)
        z = ds.get("zero_optimization", {})
        if (z.get("offload_optimizer") or {}).get("device") == "nvme":
            cpu, disk = _nvme_host_bytes(z, dense_params, world_size)
            return {"gpu_gib": gpu / GIB, "cpu_gib": cpu / GIB, "nvme_gib": disk / GIB}
    elif stage in (1, 2):
        cpu, gpu = estimate_zero2_model_states_mem_needs(dense_params, world_size, 1, cpu_offload=opt_off)
        if stage == 1:
            gpu += 2 * dense_params * (1 - 1 / world_size)
    else:  # no ZeRO: weights, gradients, fp32 master weights and Adam moments all on every GPU
        cpu, gpu = 0.0, 16.0 * dense_params
    return {"gpu_gib": gpu / GIB, "cpu_gib": cpu / GIB}


def _nvme_host_bytes(z: dict, dense_params: int, world_size: int) -> tuple[float, float]:
    """(host bytes per node, disk bytes) of ZeRO-3 model states with the optimizer on NVMe (ZeRO-Infinity).

    DeepSpeed's CPU-offload estimate counts 18 bytes per parameter on the host: bf16 weights (2), the fp32
    gradient partition the optimizer reads (4), fp32 master weights and Adam's two moments (12). On NVMe the last
    12 live on disk (with the weights' 2 too under `offload_param: nvme`), and each rank holds `buffer_count` fp32
    swap buffers of one optimizer sub-group (`sub_group_size` elements, at most its partition) instead; the host
    part keeps DeepSpeed's 1.5x buffer factor."""
    on_disk_params = (z.get("offload_param") or {}).get("device") == "nvme"
    opt = z.get("offload_optimizer") or {}
    per_param_host = 4 + (0 if on_disk_params else 2)
    group = min(int(z.get("sub_group_size", 1_000_000_000)), math.ceil(dense_params / world_size))
    buffers = world_size * int(opt.get("buffer_count", 4)) * group * 4
    return per_param_host * dense_params * 1.5 + buffers, (12 + (2 if on_disk_params else 0)) * dense_params


def activation_elements(t, history: int, n_in: int, n_global: int, fused_attention: bool = True) -> dict[str, float]:  # noqa: ANN001
    """Elements autograd keeps per sample for backward, by part, without checkpointing (`t`: a TeacherConfig).

    Counted from the shapes: H events x E for the event embeddings and the merge input, M = H / merge_k merged
    tokens x LONGER width for the keys and values of the cross-attention, Nq = globals + recent_k queries x width
    per LONGER layer, T tokens x D per TokenMixer block plus the per-token SwiGLU's 2F up-projection, F gated
    activation and F product. fused_attention: the Triton kernel (CUDA) keeps no attention matrix; the PyTorch
    reference (CPU) keeps the padded scores and probabilities, 2 x heads x Nq x M."""
    m = math.ceil(history / t.merge_k)
    dl, e, nq = t.longer_dim, t.emb_dim, n_global + t.recent_k
    f = max(1, int(t.d_model * t.ffn_mult))
    experts = (t.moe_experts + 1) if t.moe_experts else 1
    ffn_q = nq * 8 * dl  # LONGER's SwiGLU FFN (mult 2): norm out, 4d up, silu, product
    out = {
        "longer.events": 2.0 * history * e + m * dl,  # event embeddings, merge grid, merged tokens
        "longer.cross": 4.0 * m * dl + 6.0 * nq * dl + ffn_q
        + (0 if fused_attention else 2.0 * t.longer_heads * nq * m),
        "longer.self": (t.longer_layers - 1) * (10.0 * nq * dl + 3.0 * t.longer_heads * nq * nq + ffn_q),
        "mixer.tokenizer": float(n_in + t.num_tokens * t.d_model),
        "mixer.blocks": t.num_layers * experts * t.num_tokens * (4.0 * t.d_model + 4.0 * f),
    }
    return out


def activation_elements_checkpointed(t, history: int, n_in: int, n_global: int,  # noqa: ANN001
                                     fused_attention: bool = True) -> dict[str, float]:
    """As activation_elements under `activation_checkpointing: block`: each LONGER layer and TokenMixer block
    keeps only its input, and backward recomputes one block at a time (so the largest block's activations are
    added once)."""
    full = activation_elements(t, history, n_in, n_global, fused_attention)
    m = math.ceil(history / t.merge_k)
    nq = n_global + t.recent_k
    per_block = {"longer.cross": full["longer.cross"],
                 "longer.self": full["longer.self"] / max(1, t.longer_layers - 1),
                 "mixer.blocks": full["mixer.blocks"] / t.num_layers}
    return {
        "longer.events": full["longer.events"],
        "longer.cross": float(nq * t.longer_dim + m * t.longer_dim),  # queries + merged tokens (the block's inputs)
        "longer.self": (t.longer_layers - 1) * float(nq * t.longer_dim),
        "mixer.tokenizer": full["mixer.tokenizer"],
        "mixer.blocks": t.num_layers * float(t.num_tokens * t.d_model),
        "recompute (largest block)": max(per_block.values()),
    }


def embedding_bytes_per_rank(plan_rows: list[dict], world_size: int) -> list[int]:
    """Bytes of embedding weights + RowWiseAdagrad state (one fp32 per row) per rank, from rows of
    `describe_plan` (each with its table's rows, dim and the ranks of its shards with their sizes)."""
    per_rank = [0] * world_size
    for row in plan_rows:
        for rank, (rows, cols) in row["shards"]:
            per_rank[rank] += 4 * rows * cols + 4 * rows
    return per_rank


def fit_report(*, dense_params: int, largest_layer: int, cfg, ds: dict, world_size: int,  # noqa: ANN001
               gpu_mem_gib: float, n_in: int, n_global: int, plan_rows: list[dict], batch: int | None = None,
               fused_attention: bool = True) -> dict:
    """Per-GPU memory for `cfg` (a Config) under DeepSpeed config `ds` on `world_size` GPUs of `gpu_mem_gib`:
    model states, activations with and without checkpointing, embeddings on the fullest rank; the verdict uses the
    config's own activation_checkpointing setting and bf16 (the precision on GPUs: auto means bf16 there)."""
    t = cfg.teacher
    history = min(t.history_len, cfg.data.history_len)
    batch = batch or cfg.data.batch_size
    act_bytes = 4 if t.precision == "fp32" else 2
    states = model_state_gib(ds, dense_params, largest_layer, world_size)
    acts = {}
    for mode, fn in (("none", activation_elements), ("block", activation_elements_checkpointed)):
        parts = fn(t, history, n_in, n_global, fused_attention)
        acts[mode] = {"per_sample_mib": sum(parts.values()) * act_bytes / 2**20,
                      "gib": sum(parts.values()) * act_bytes * batch / GIB, "parts": parts}
    emb = embedding_bytes_per_rank(plan_rows, world_size)
    emb_gib = max(emb) / GIB if emb else 0.0
    need = {mode: states["gpu_gib"] + acts[mode]["gib"] + emb_gib for mode in acts}
    used = need[t.activation_checkpointing]
    return {"world_size": world_size, "gpu_mem_gib": gpu_mem_gib, "micro_batch": batch, "history": history,
            "activation_bytes": act_bytes, "zero_stage": zero_stage(ds)[0], "offload_optimizer": zero_stage(ds)[1],
            "offload_param": zero_stage(ds)[2], "model_states": states, "activations": acts,
            "embedding_gib_max_rank": emb_gib, "embedding_gib_total": sum(emb) / GIB, "need_gib": need,
            "checkpointing": t.activation_checkpointing, "fits": used <= gpu_mem_gib,
            "margin_gib": gpu_mem_gib - used}


def print_fit(f: dict, plan_rows: list[dict]) -> None:
    """The fit table, the verdict and the sharding plan."""
    offload = (", optimizer offload" if f["offload_optimizer"] else "") + (
        ", parameter offload" if f["offload_param"] else "")
    print(f"\nper-GPU memory, {f['world_size']} GPU(s) of {f['gpu_mem_gib']:g} GiB: ZeRO-{f['zero_stage']}{offload}"
          f", micro batch {f['micro_batch']}, history {f['history']}, {f['activation_bytes']}-byte activations")
    disk = f"; NVMe: {f['model_states']['nvme_gib']:.1f} GiB" if "nvme_gib" in f["model_states"] else ""
    print(f"  {'model states (DeepSpeed estimate)':<40}{f['model_states']['gpu_gib']:>10.2f} GiB  "
          f"(host: {f['model_states']['cpu_gib']:.1f} GiB per node{disk})")
    for mode, a in f["activations"].items():
        print(f"  {'activations, checkpointing ' + mode:<40}{a['gib']:>10.2f} GiB  ({a['per_sample_mib']:.2f} MiB "
              "per sample)")
    print(f"  {'embeddings + RowWiseAdagrad, fullest rank':<40}{f['embedding_gib_max_rank']:>10.2f} GiB  "
          f"(all ranks: {f['embedding_gib_total']:.2f} GiB)")
    for mode, need in f["need_gib"].items():
        mark = "  <- this config" if mode == f["checkpointing"] else ""
        print(f"  {'total, checkpointing ' + mode:<40}{need:>10.2f} GiB{mark}")
    verdict = "FITS" if f["fits"] else "DOES NOT FIT"
    print(f"{verdict}: margin {f['margin_gib']:+.2f} GiB per GPU (activation_checkpointing={f['checkpointing']})")
    print("\nsharding plan (table: type, ranks):")
    for row in plan_rows:
        ranks = sorted({r for r, _ in row["shards"]})
        shown = ",".join(map(str, ranks[:8])) + (f",... ({len(ranks)} ranks)" if len(ranks) > 8 else "")
        print(f"  {row['table']:<24}{row['rows']:>12,} x {row['dim']:<5}{row['type']:<14}ranks {shown}")
