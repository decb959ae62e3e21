"""The teacher's scale path on CPU ranks (issue 15): bf16 against fp32, ZeRO-1 and ZeRO-3 + CPU offload through the
real trainer, and two "nodes" of one rank each against one node of two ranks.

bf16 tolerance: bf16 keeps 8 significant bits, so each op rounds to about 2^-9 (2e-3) relative; the tiny model's
logits (|z| < 1) come out a few 1e-3 from fp32 through a dozen rounded layers. 2e-2 absolute on logits is several
times that and still ten times below what the step itself moves them (asserted, so a skipped step fails). Dense
weights after the step, element by element: within 2^-8 |w| (the bf16 copy of DeepSpeed's fp32 master weight is
rounded to half a bf16 step, 2^-9 relative, e.g. a norm weight's update of 4e-3 vanishes at 1.0) + 15% of the fp32
step's own update (a gradient is a sum over the batch of bf16-rounded terms; where they cancel, its relative error
grows: about 12% on one tokenizer-bias element here, a few percent elsewhere) + 2e-3. A skipped step fails that.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_workers import CFG, KINDS, WORLD, free_port, reference
from helpers import SCHEMA, SHORT_SETS, TINY_CONFIG, ZERO1_SETS, make_batch

from recdistill.config import TeacherConfig, load_config
from recdistill.models.teacher import TeacherModel
from recdistill.signals.reader import SignalReader
from recdistill.train.distributed import local_world_size
from recdistill.train.parallelize import offloads_optimizer, sharding_plan
from recdistill.train.teacher import deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
TOL = dict(atol=2e-2, rtol=0)


def test_deepspeed_bf16_follows_teacher_precision():
    for precision, want in (("bf16", True), ("fp32", False), ("auto", False)):
        cfg = load_config(None, [f"teacher.precision={precision}"])
        assert deepspeed_config(cfg, cfg.teacher.deepspeed, torch.device("cpu"))["bf16"] == {"enabled": want}
    cfg = load_config(None, ["teacher.precision=auto"])
    assert deepspeed_config(cfg, cfg.teacher.deepspeed, torch.device("cuda", 0))["bf16"] == {"enabled": True}


def test_local_size_places_shards_on_the_local_device(monkeypatch):
    """2 nodes x 8 GPUs: rank 9 is the second GPU of node 1 (cuda:1), not cuda:9."""
    model = TeacherModel(SCHEMA, TeacherConfig(**CFG))
    plan = sharding_plan(model, "row_wise", 16, "cuda", local_size=8)
    shards = next(iter(plan.plan["embed.sparse.ebc"].values())).sharding_spec.shards
    assert [str(s.placement) for s in shards[8:10]] == ["rank:8/cuda:0", "rank:9/cuda:1"]
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun
    assert local_world_size(16) == 8
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("LOCAL_SIZE", "4")  # the deepspeed launcher
    assert local_world_size(16) == 4 and os.environ["LOCAL_WORLD_SIZE"] == "4"  # exported for TorchRec's own look-up
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("LOCAL_SIZE")
    assert local_world_size(2) == 2  # a single node
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="must divide"):
        local_world_size(8)


#: the sharded-step cases of this module (dist_workers.step_case kwargs), by the test that checks each
STEP_CASES = {
    "test_bf16_step_matches_fp32_step_and_trains": dict(sharding="row_wise", stage=2, bf16=True, more_steps=5),
    "test_construction_without_a_full_copy_trains_the_same_step": dict(sharding="row_wise", stage=3, meta=True)}


def sharded_step_cases(items) -> dict:  # noqa: ANN001 - pytest items
    """This module's cases among the session's selected `items`, for tests/train/conftest.py's sharded_steps (which
    runs them on one pair of ranks with test_parallel_teacher.py's)."""
    names = {item.originalname for item in items}
    return {n: kw for n, kw in STEP_CASES.items() if n in names}


def step_result(sharded_steps, name: str) -> tuple[dict, dict]:
    init, results = sharded_steps
    assert "error" not in results[name], results[name]["error"]
    return init, results[name]


@pytest.mark.multiproc
@pytest.mark.slow
def test_bf16_step_matches_fp32_step_and_trains(sharded_steps):
    init, out = step_result(sharded_steps, "test_bf16_step_matches_fp32_step_and_trains")
    before, after, ref_model = reference(make_batch(n=16, seed=5), init)  # the fp32 step, single process
    ref_dense = dict(ref_model.dense.named_parameters())
    for r in range(WORLD):
        rows = slice(r * 8, r * 8 + 8)
        for task in KINDS:
            moved = (after[task][rows] - before[task][rows]).abs().max()
            assert moved > 5 * TOL["atol"], f"the fp32 step hardly moves task {task}: nothing would be checked"
            torch.testing.assert_close(out[r]["before"][task], before[task][rows].detach(), **TOL,
                                       msg=f"rank {r} bf16 logits before the step, task {task}")
            torch.testing.assert_close(out[r]["after"][task], after[task][rows], **TOL,
                                       msg=f"rank {r} bf16 logits after one step, task {task}")
        for name, value in out[r]["dense"].items():
            assert value.dtype == torch.bfloat16, name  # DeepSpeed's bf16 mode was really on
            want, start = ref_dense[name].detach(), init[f"dense.{name}"]
            bound = 2**-8 * want.abs() + 0.15 * (want - start).abs() + 2e-3  # see the module docstring
            worst = ((value.float() - want).abs() / bound).max()
            assert worst <= 1, f"rank {r} dense parameter {name} after one bf16 step: {worst:.2f} x the bound"
        losses = out[r]["losses"]  # five more steps on the same batch: it is learned
        assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.01, losses


def torchrun(tmp_path: Path, name: str, sets: list[str], launch: list[str], env: dict | None = None,
             wait: bool = True, timeout: int = 300):  # noqa: ANN201 - CompletedProcess or Popen
    """The real trainer under torchrun with `launch` arguments; summaries at tmp_path/name.rank{r}.json."""
    sets = [*sets, f"signals.uri={tmp_path}/{name}-sig", f"tracking.run_dir={tmp_path}/runs"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "recdistill.train.teacher",
           "--config", TINY_CONFIG, "--summary", str(tmp_path / name),
           "--eval-out", str(tmp_path / f"{name}-eval.npz"), *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def summaries(tmp_path: Path, name: str) -> list[dict]:
    return [json.loads((tmp_path / f"{name}.rank{r}.json").read_text()) for r in range(2)]


ZERO1 = ("zero1", "fp32", "none")


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("zero,precision,ckpt", [ZERO1, ("zero3_offload", "bf16", "block")])
def test_trainer_runs_zero1_and_offload(request, tmp_path, zero, precision, ckpt):
    """ZeRO-1 (fp32) and ZeRO-3 with optimizer and parameters offloaded to CPU (DeepSpeedCPUAdam; in bf16 with
    activation checkpointing, as the 7b preset runs) each train a few steps of the real trainer on 2 ranks and
    write every row. DeepSpeedCPUAdam is JIT-built on its first use on a machine (minutes), then cached. The ZeRO-1
    run is conftest.py's one_node_zero1 (through launch/teacher_torchrun.sh; also the two-nodes test's reference)."""
    sets = [*SHORT_SETS, f"teacher.deepspeed=configs/deepspeed/{zero}.json", f"teacher.precision={precision}",
            f"teacher.activation_checkpointing={ckpt}"]
    if (zero, precision, ckpt) == ZERO1:
        assert sets == ZERO1_SETS
        root, name = request.getfixturevalue("one_node_zero1")[0], "one"
    else:
        # a cold TORCH_EXTENSIONS_DIR builds DeepSpeedCPUAdam first: minutes on a busy 2-core machine
        root, name = tmp_path, "run"
        proc = torchrun(root, name, sets, ["--nproc_per_node=2", f"--master_port={free_port()}"], timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    sums = summaries(root, name)
    assert sums[0]["steps"] == sums[1]["steps"] == 4 and all(np.isfinite(s["loss"]) for s in sums)
    reader = SignalReader(str(root / f"{name}-sig"))
    assert reader.stats.rows == sum(s["trained_samples"] for s in sums) == 2 * 4 * 32
    assert reader.stats.duplicates == 0 and reader.stats.non_finite_rows == 0
    logits, found = reader.lookup(torch.as_tensor(reader.sample_ids))
    assert bool(found.all()) and bool(torch.isfinite(logits).all())
    assert np.isfinite(np.load(root / f"{name}-eval.npz")["pred_ctr"]).all()


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_nodes_of_one_rank_equal_one_node_of_two(tmp_path, one_node_zero1):
    """torchrun --nnodes 2 --node_rank {0,1} --nproc_per_node 1 over a localhost rendezvous (what SLURM's one
    torchrun per node does, launch/teacher_slurm.sbatch) takes the same steps as one node of two ranks (conftest's
    one_node_zero1, the same settings): same losses, same stored logits for every sample, same eval predictions
    (the trained parameters)."""
    port = free_port()
    one_node = one_node_zero1[0]
    nodes = [torchrun(tmp_path, "nodes", ZERO1_SETS, ["--nnodes=2", f"--node_rank={n}", "--nproc_per_node=1",
                                                      "--master_addr=127.0.0.1", f"--master_port={port}"], wait=False)
             for n in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(log[-2000:] for log in logs)
    dirs = {"nodes": tmp_path, "one": one_node}
    for a, b in zip(summaries(tmp_path, "nodes"), summaries(one_node, "one"), strict=True):
        assert a["rank"] == b["rank"] and a["steps"] == b["steps"] == 4 and a["batches"] == b["batches"]
        assert (a["local_world_size"], b["local_world_size"]) == (1, 2)  # from torchrun's LOCAL_WORLD_SIZE
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), (a["loss"], b["loss"])
    sig = {n: SignalReader(str(d / f"{n}-sig")) for n, d in dirs.items()}
    ids = np.sort(sig["one"].sample_ids)
    assert np.array_equal(np.sort(sig["nodes"].sample_ids), ids) and len(ids) == 2 * 4 * 32
    got = {n: r.lookup(torch.as_tensor(ids))[0] for n, r in sig.items()}
    torch.testing.assert_close(got["nodes"], got["one"], atol=1e-6, rtol=1e-5)  # fp32; reduction order only
    ev = {n: np.load(d / f"{n}-eval.npz") for n, d in dirs.items()}
    assert np.array_equal(ev["nodes"]["sample_id"], ev["one"]["sample_id"])
    np.testing.assert_allclose(ev["nodes"]["pred_ctr"], ev["one"]["pred_ctr"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "small", "1b", "7b", "24b"])
def test_each_preset_names_a_deepspeed_config_that_loads(name):
    cfg = load_config(ROOT / "configs" / "teacher" / f"{name}.yaml", [])
    ds = deepspeed_config(cfg, cfg.teacher.deepspeed, torch.device("cpu"))
    stage = ds["zero_optimization"]["stage"]
    assert stage == {"tiny": 2, "small": 2, "1b": 2, "7b": 3, "24b": 3}[name]
    assert offloads_optimizer(ds) == (name == "7b")


@pytest.mark.multiproc
@pytest.mark.slow
def test_construction_without_a_full_copy_trains_the_same_step(sharded_steps):
    """build_teacher (what the trainer builds): under ZeRO-3 on 2 ranks each holds half of the dense parameters
    right after construction and no table element until DMP allocates its row-wise shard (half of each table);
    with the same initial values loaded, the step equals the single-process reference (fp32, as in
    tests/train/test_parallel_teacher.py)."""
    init, out = step_result(sharded_steps, "test_construction_without_a_full_copy_trains_the_same_step")
    before, after, ref_model = reference(make_batch(n=16, seed=5), init)
    ref_dense = dict(ref_model.dense.named_parameters())
    embed_full = sum(v.numel() for k, v in init.items() if k.startswith("embed."))
    for r in range(WORLD):
        n = out[r]["numel"]
        assert n["dense_full"] == sum(p.numel() for p in ref_dense.values())
        assert 0.45 < n["dense"] / n["dense_full"] < 0.56, n  # ZeRO-3 pads each partition to whole elements
        assert n["embed"] == 0 and 0.45 < n["embed_sharded"] / embed_full < 0.56, (n, embed_full)
        for name, value in out[r]["dense"].items():
            torch.testing.assert_close(value, ref_dense[name].detach(), atol=1e-6, rtol=1e-5,
                                       msg=f"rank {r} dense parameter {name} after one step")
        rows = slice(r * 8, r * 8 + 8)
        for task in KINDS:
            torch.testing.assert_close(out[r]["before"][task], before[task][rows], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(out[r]["after"][task], after[task][rows], atol=1e-6, rtol=1e-5)


def test_auto_plan_and_pins():
    """auto on CPU plans table/column-wise only (the planner's row-wise is GPU-only), never data_parallel (the
    fused optimizer would not update such a table); a pin, by feature or table name, wins in every mode (row-wise
    on CPU too, through the explicit plan); a pin naming nothing is refused."""
    from recdistill.train.parallelize import describe_plan

    with torch.device("meta"):
        model = TeacherModel(SCHEMA, TeacherConfig(**CFG))
    for device, allowed in (("cpu", {"table_wise", "column_wise"}),
                            ("cuda", {"table_wise", "column_wise", "row_wise", "table_row_wise"})):
        rows = {r["table"]: r for r in describe_plan(model, sharding_plan(model, "auto", 2, device))}
        assert {r["type"] for r in rows.values()} <= allowed, rows
        pinned = {r["table"]: r for r in describe_plan(model, sharding_plan(
            model, "auto", 2, device, pins={"item_id": "row_wise", "h_cat": "table_wise"}))}
        assert pinned["t_item_id"]["type"] == "row_wise" and pinned["h_cat"]["type"] == "table_wise"
        assert [r for r, _ in pinned["t_item_id"]["shards"]] == [0, 1]
    explicit = {r["table"]: r["type"] for r in describe_plan(model, sharding_plan(
        model, "column_wise", 2, "cpu", pins={"user_id": "table_wise"}))}
    assert explicit.pop("t_user_id") == "table_wise" and set(explicit.values()) == {"column_wise"}
    with pytest.raises(ValueError, match="names no table"):
        sharding_plan(model, "auto", 2, "cpu", pins={"no_such_feature": "row_wise"})
