"""Size a teacher without memory (what `recdistill teacher --dry-run` prints).

    recdistill teacher --dry-run --config configs/teacher/7b.yaml --world-size 8
    recdistill teacher --dry-run --preset 24b --world-size 64 --gpu-mem-gib 80      # does it fit? (fit.py)

Builds the model on the meta device (no memory), prints dense and embedding parameters by module, forward FLOPs
per sample by module (analytic, at the configured history length), and DeepSpeed's own ZeRO model-state memory
estimates per GPU for the given world size. Training itself is the teacher trainer's job (issue 4).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from recdistill.config import Config
from recdistill.data.batch import Roles, Schema
from recdistill.models.teacher import TeacherModel

EMBEDDING_PREFIXES = ("embed.",)


def param_table(model: torch.nn.Module) -> OrderedDict[str, dict[str, int]]:
    """Parameters per top-level module (mixer blocks one by one), split into dense and embedding."""
    out: OrderedDict[str, dict[str, int]] = OrderedDict()
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[1:4]) if parts[1:3] == ["mixer", "blocks"] else parts[1]
        row = out.setdefault(key, {"dense": 0, "embedding": 0})
        row["embedding" if name.startswith(EMBEDDING_PREFIXES) else "dense"] += p.numel()
    return out


def flops_per_sample(cfg: Config, schema: Schema, n_in: int, n_global: int) -> OrderedDict[str, float]:
    """Forward FLOPs per sample by module (2 per multiply-add), for a full history of `history_len` events;
    `n_in` / `n_global`: the mixer's input width and LONGER's global query tokens, read off the built model."""
    t = cfg.teacher
    h = min(t.history_len, cfg.data.history_len)
    m = math.ceil(h / t.merge_k)  # merged tokens
    dl, e = t.longer_dim, t.emb_dim
    nq = n_global + t.recent_k
    f = max(1, int(t.d_model * t.ffn_mult))
    experts = (t.moe_experts + 1) if t.moe_experts else 1  # reference MoE runs every expert + the shared one
    out: OrderedDict[str, float] = OrderedDict()
    out["longer.merge"] = 2.0 * m * t.merge_k * e * dl
    out["longer.cross_attention"] = 2.0 * (2 * nq * dl * dl + 2 * m * dl * dl) + 4.0 * nq * m * dl
    out["longer.self_attention"] = (t.longer_layers - 1) * (8.0 * nq * dl * dl + 4.0 * nq * nq * dl)
    out["longer.ffn"] = t.longer_layers * 12.0 * nq * dl * dl
    out["mixer.tokenizer"] = 2.0 * n_in * t.d_model
    out["mixer.blocks"] = t.num_layers * experts * 6.0 * t.num_tokens * t.d_model * f
    out["heads"] = 2.0 * len(schema.tasks) * t.d_model
    return out


def zero_estimates(dense_params: int, largest_layer: int, world_size: int) -> dict[str, dict[str, float]]:
    """DeepSpeed's model-state memory estimates (GiB per GPU / per node CPU) for ZeRO-2 and ZeRO-3."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    gib = 1024**3
    out = {}
    for offload in (False, True):
        cpu, gpu = estimate_zero2_model_states_mem_needs(dense_params, world_size, 1, cpu_offload=offload)
        out[f"zero2{'_offload' if offload else ''}"] = {"gpu_gib": gpu / gib, "cpu_gib": cpu / gib}
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(dense_params, largest_layer, world_size, 1,
                                                            cpu_offload=offload, cpu_offload_params=offload)
        out[f"zero3{'_offload' if offload else ''}"] = {"gpu_gib": gpu / gib, "cpu_gib": cpu / gib}
    return out


def dry_run(cfg: Config, schema: Schema, world_size: int, roles: Roles | None = None,
            gpu_mem_gib: float | None = None, gpus_per_node: int = 8, fused_attention: bool = True) -> dict:
    """Everything `--dry-run` reports, as a dict; `roles`: the resolved feature roles (None: the conventional
    names the schema has). gpu_mem_gib: also whether the preset fits `world_size` GPUs of that memory under its
    own DeepSpeed config and sharding (the 'fit' and 'plan' keys; recdistill/train/fit.py); fused_attention: False
    for CPU ranks, where the attention is the PyTorch reference (activation_elements)."""
    with torch.device("meta"):
        model = TeacherModel(schema, cfg.teacher, roles)
    params = param_table(model)
    dense = sum(r["dense"] for r in params.values())
    emb = sum(r["embedding"] for r in params.values())
    largest = max(p.numel() for n, p in model.named_parameters() if not n.startswith(EMBEDDING_PREFIXES))
    flops = flops_per_sample(cfg, schema, model.dense.mixer.tokenizer.padded_in, model.dense.n_global)
    report = {"preset": cfg.teacher.preset, "roles": model.roles.as_dict(), "dense_params": dense,
              "embedding_params": emb, "params": params,
              "flops_per_sample": flops, "gflops_per_sample": sum(flops.values()) / 1e9, "world_size": world_size,
              "zero_memory": zero_estimates(dense, largest, world_size)}
    if gpu_mem_gib is not None:
        report.update(fit_on_gpus(cfg, model, dense, largest, world_size, gpu_mem_gib, gpus_per_node,
                                  fused_attention))
    return report


def fit_on_gpus(cfg: Config, model: TeacherModel, dense: int, largest: int, world_size: int, gpu_mem_gib: float,
                gpus_per_node: int, fused_attention: bool = True) -> dict:
    """The 'plan' and 'fit' keys of dry_run: the sharding plan on `world_size` GPUs (the torchrec backend's
    tables; the plan of a meta-device model) and the per-GPU memory verdict."""
    from recdistill.train.fit import fit_report
    from recdistill.train.parallelize import describe_plan, sharding_plan
    from recdistill.train.teacher import deepspeed_config

    ds = deepspeed_config(cfg, cfg.teacher.deepspeed, torch.device("cuda"))
    rows = []
    if cfg.teacher.embedding_backend == "torchrec":
        plan = sharding_plan(model, cfg.teacher.sharding, world_size, "cuda", math.gcd(world_size, gpus_per_node),
                             cfg.teacher.sharding_pins, cfg.teacher.sharding_mem_gib or gpu_mem_gib)
        rows = describe_plan(model, plan)
    fit = fit_report(dense_params=dense, largest_layer=largest, cfg=cfg, ds=ds, world_size=world_size,
                     gpu_mem_gib=gpu_mem_gib, n_in=model.dense.mixer.tokenizer.padded_in,
                     n_global=model.dense.n_global, plan_rows=rows, fused_attention=fused_attention)
    return {"plan": rows, "fit": fit}


def print_report(r: dict) -> None:
    """Human-readable tables of a dry_run() result."""
    print(f"teacher preset '{r['preset']}': {r['dense_params'] / 1e9:.3f} B dense parameters, "
          f"{r['embedding_params'] / 1e6:.1f} M embedding parameters")
    print("feature roles: " + ", ".join(f"{k}={v or '-'}" for k, v in r["roles"].items()))
    print(f"{'module':<24}{'dense':>16}{'embedding':>16}")
    for k, v in r["params"].items():
        print(f"{k:<24}{v['dense']:>16,}{v['embedding']:>16,}")
    print(f"\nforward FLOPs per sample: {r['gflops_per_sample']:.3f} GFLOP")
    for k, v in r["flops_per_sample"].items():
        print(f"  {k:<24}{v / 1e9:>12.4f} GFLOP")
    print(f"\nDeepSpeed ZeRO model-state memory estimate, world size {r['world_size']} (per GPU / CPU per node):")
    for k, v in r["zero_memory"].items():
        print(f"  {k:<16}{v['gpu_gib']:>10.1f} GiB GPU {v['cpu_gib']:>10.1f} GiB CPU")
    if "fit" in r:
        from recdistill.train.fit import print_fit

        print_fit(r["fit"], r["plan"])
