"""`teacher --dry-run`: presets have the dense size their names say (within 10%), built without memory."""

from pathlib import Path

import pytest

from recdistill.config import load_config
from recdistill.data.world import SyntheticWorld
from recdistill.train.dryrun import dry_run, print_report

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "teacher"


@pytest.mark.parametrize("name,target", [("1b", 1e9), ("7b", 7e9), ("24b", 24e9)])
def test_preset_dense_size_within_10_percent(name, target, capsys):
    cfg = load_config(PRESETS / f"{name}.yaml")
    report = dry_run(cfg, SyntheticWorld(cfg.data).schema, world_size=8)
    assert abs(report["dense_params"] / target - 1) < 0.10, report["dense_params"]
    assert report["embedding_params"] > 0
    assert sum(r["dense"] for r in report["params"].values()) == report["dense_params"]
    # the per-token FFNs dominate the FLOPs of such a model
    assert report["flops_per_sample"]["mixer.blocks"] > 0.5 * sum(report["flops_per_sample"].values())
    z = report["zero_memory"]
    assert z["zero3"]["gpu_gib"] < z["zero2"]["gpu_gib"]  # ZeRO-3 partitions the parameters too
    assert z["zero2_offload"]["gpu_gib"] < z["zero2"]["gpu_gib"]
    print_report(report)
    out = capsys.readouterr().out
    assert f"teacher preset '{name}'" in out and "mixer.blocks.0" in out and "zero3_offload" in out


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_flops_estimate_matches_a_counted_forward(preset):
    """The analytic FLOPs per sample agree with torch's FLOP counter on a real forward with full histories."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from recdistill.models.match import NUM_MATCH
    from recdistill.models.teacher import TeacherModel
    from recdistill.train.dryrun import flops_per_sample

    cfg = load_config(PRESETS / f"{preset}.yaml", ["teacher.embedding_backend=torch"])
    schema = SyntheticWorld(cfg.data).schema
    dense = TeacherModel(schema, cfg.teacher).dense
    b, h, e = 2, min(cfg.teacher.history_len, cfg.data.history_len), cfg.teacher.emb_dim
    with FlopCounterMode(display=False) as counter:
        dense({f: torch.randn(b, e) for f in dense.features}, torch.randn(b, len(schema.dense)),
              torch.randn(b * h, e), torch.arange(0, b * h + 1, h), torch.randn(b, NUM_MATCH))
    counted = counter.get_flop_counts()  # module -> {op: flops}, for the whole batch
    est = flops_per_sample(cfg, schema, dense.mixer.tokenizer.padded_in, dense.n_global)
    for part in ("longer", "mixer"):
        got = sum(v for k, v in est.items() if k.startswith(part + "."))
        want = sum(counted[f"TeacherDense.{part}"].values()) / b
        assert abs(got / want - 1) < 0.03, (part, got, want)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_activation_estimate_matches_what_autograd_keeps(preset):
    """The analytic activation count against the bytes autograd really saves for backward (saved-tensor hooks on a
    real fp32 forward with full histories, the reference attention): within 25% without checkpointing; with
    block checkpointing what stays saved (the estimate less its one-block recompute, which exists only during
    backward) within a factor 1.6, and far below the un-checkpointed figure."""
    import torch

    from recdistill.models.match import NUM_MATCH
    from recdistill.models.teacher import TeacherModel
    from recdistill.train.fit import activation_elements, activation_elements_checkpointed

    for ckpt in ("none", "block"):
        cfg = load_config(PRESETS / f"{preset}.yaml", ["teacher.embedding_backend=torch",
                                                       f"teacher.activation_checkpointing={ckpt}"])
        schema = SyntheticWorld(cfg.data).schema
        dense = TeacherModel(schema, cfg.teacher).dense
        b, h, e = 4, min(cfg.teacher.history_len, cfg.data.history_len), cfg.teacher.emb_dim
        saved = {}

        def pack(t, saved=saved):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            dense({f: torch.randn(b, e, requires_grad=True) for f in dense.features}, torch.randn(b, len(schema.dense)),
                  torch.randn(b * h, e, requires_grad=True), torch.arange(0, b * h + 1, h), torch.randn(b, NUM_MATCH))
        weights = {p.untyped_storage().data_ptr() for p in dense.parameters()}
        got = sum(n for ptr, n in saved.items() if ptr not in weights) / b
        args = (cfg.teacher, h, dense.mixer.tokenizer.padded_in, dense.n_global)
        full = 4 * sum(activation_elements(*args, fused_attention=False).values())
        if ckpt == "none":
            assert 0.8 < full / got < 1.25, (full, got)
        else:
            parts = activation_elements_checkpointed(*args, fused_attention=False)
            kept = 4 * (sum(parts.values()) - parts["recompute (largest block)"])
            assert 1 / 1.6 < kept / got < 1.6 and got < 0.5 * full, (kept, got, full)


def dry_fit(name: str, world: int, gib: float, *sets: str) -> dict:
    cfg = load_config(PRESETS / f"{name}.yaml", list(sets))
    return dry_run(cfg, SyntheticWorld(cfg.data).schema, world_size=world, gpu_mem_gib=gib)


def test_fit_verdicts_on_the_presets(capsys):
    """tiny fits one 1 GiB GPU; 24b (ZeRO-3, its preset) does not fit one 80 GB GPU (its ~390 GB of model states)
    and fits 64 of them with activation checkpointing, with a smaller margin without it; ZeRO-3's parameter
    partitioning is what makes the difference (its model states shrink with the world size)."""
    tiny = dry_fit("tiny", 1, 1.0)
    assert tiny["fit"]["fits"] and 0 < tiny["fit"]["margin_gib"] < 1
    one = dry_fit("24b", 1, 80.0)
    assert not one["fit"]["fits"] and one["fit"]["model_states"]["gpu_gib"] > 300
    many = dry_fit("24b", 64, 80.0)
    f = many["fit"]
    assert f["fits"] and f["checkpointing"] == "block" and f["zero_stage"] == 3
    assert f["model_states"]["gpu_gib"] < one["fit"]["model_states"]["gpu_gib"] / 20
    assert f["activations"]["block"]["gib"] < 0.6 * f["activations"]["none"]["gib"]
    assert f["need_gib"]["block"] < f["need_gib"]["none"]
    print_report(many)
    out = capsys.readouterr().out
    assert "FITS: margin" in out and "sharding plan" in out and "t_item_id" in out
    # the plan covers every table and row-wise puts a shard of each on every rank
    rw = dry_fit("24b", 64, 80.0, "teacher.sharding=row_wise")["plan"]
    assert len(rw) == len(many["plan"]) and all(len({r for r, _ in t["shards"]}) == 64 for t in rw)
    assert all(sum(rows for _, (rows, _) in t["shards"]) == t["rows"] for t in rw)


def test_fit_report_through_the_cli(capsys):
    from recdistill.cli import main

    assert main(["teacher", "--dry-run", "--preset", "24b", "--world-size", "1", "--gpu-mem-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "teacher preset '24b'" in out and "DOES NOT FIT: margin -" in out


def test_nvme_optimizer_offload_moves_the_optimizer_state_to_disk():
    """ZeRO-3 with the optimizer on NVMe: DeepSpeed's CPU-offload host figure (18 bytes per parameter, x1.5) loses
    the 12 bytes of fp32 master weights and Adam moments to the disk and gains each rank's swap buffers
    (buffer_count x one sub-group of fp32); parameters offloaded to NVMe too take their 2 bytes with them."""
    from recdistill.train.fit import GIB, model_state_gib

    p, world = 1_000_000_000, 2
    cpu = {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
    nvme = {**cpu, "offload_optimizer": {"device": "nvme", "buffer_count": 4}, "sub_group_size": 100_000_000}
    on_host = model_state_gib({"zero_optimization": cpu}, p, 10_000_000, world)
    on_disk = model_state_gib({"zero_optimization": nvme}, p, 10_000_000, world)
    assert on_host["cpu_gib"] == pytest.approx(18 * p * 1.5 / GIB) and "nvme_gib" not in on_host
    assert on_disk["gpu_gib"] == on_host["gpu_gib"]
    assert on_disk["cpu_gib"] == pytest.approx((6 * p * 1.5 + world * 4 * 100_000_000 * 4) / GIB)
    assert on_disk["nvme_gib"] == pytest.approx(12 * p / GIB)
    both = {**nvme, "offload_param": {"device": "nvme"}}
    all_disk = model_state_gib({"zero_optimization": both}, p, 10_000_000, world)
    assert all_disk["nvme_gib"] == pytest.approx(14 * p / GIB) and all_disk["cpu_gib"] < on_disk["cpu_gib"]
