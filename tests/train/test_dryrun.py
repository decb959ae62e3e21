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
