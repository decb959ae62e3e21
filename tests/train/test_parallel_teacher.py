"""The sharded teacher (TorchRec DMP embeddings + DeepSpeed ZeRO dense, 2 gloo ranks) computes the same logits
and takes the same training step as a single-process run of the same math.

Same math: each rank's loss is the mean over its local batch (equal batch sizes). DeepSpeed averages dense
gradients over ranks, and TorchRec divides the summed embedding gradients by the world size (its default
gradient division, seen here: without it the table updates come out twice as large), so both equal the
gradient of the global-batch mean: the single-process reference is plain SGD on the whole batch (or, for the
tables, torchrec's unfused RowWiseAdagrad where the sharded run has the trainer's fused one).
Tolerance: fp32, 1e-6 absolute / 1e-5 relative on logits and dense weights (only the reduction order differs).
The cases run one after another on one pair of spawned ranks (conftest.py's sharded_steps, with
test_teacher_scale.py's), each on a model of its own: the ranks' start-up, most of a case's time on CPU, is paid once.
"""

import pytest
import torch
from dist_workers import KINDS, WORLD, reference
from helpers import make_batch

CASES = [(s, z, "sgd") for s in ("table_wise", "column_wise", "row_wise") for z in (2, 3)] + [
    ("auto", 2, "rowwise_adagrad"), ("auto", 3, "rowwise_adagrad"), ("row_wise", 3, "rowwise_adagrad")]


def sharded_step_cases(items) -> dict:  # noqa: ANN001 - pytest items
    """This module's cases among the session's selected `items` ({case: dist_workers.step_case kwargs}), for
    tests/train/conftest.py's sharded_steps."""
    ids = {item.callspec.id for item in items if item.originalname == "test_sharded_step_matches_single_process"}
    return {c: dict(sharding=c[0], stage=c[1], sparse=c[2]) for c in CASES if "-".join(map(str, c)) in ids}


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("sharding,stage,sparse", CASES)
def test_sharded_step_matches_single_process(sharded_steps, sharding, stage, sparse):
    """sparse: the tables' optimizer; rowwise_adagrad is the trainer's (fbgemm's fused kernel in the sharded run,
    torchrec's RowWiseAdagrad class in the reference), and `auto` is planned by TorchRec's planner on CPU."""
    init, results = sharded_steps
    out = results[(sharding, stage, sparse)]
    assert "error" not in out, out["error"]
    full = make_batch(n=16, seed=5)
    before, after, ref_model = reference(full, init, sparse)
    ref_dense = dict(ref_model.dense.named_parameters())
    for r in range(WORLD):
        assert out[r]["dense"].keys() == ref_dense.keys()
        for name, value in out[r]["dense"].items():
            torch.testing.assert_close(value, ref_dense[name].detach(), atol=1e-6, rtol=1e-5,
                                       msg=f"rank {r} dense parameter {name} after one step")
    for r in range(WORLD):
        rows = slice(r * 8, r * 8 + 8)
        for task in KINDS:
            torch.testing.assert_close(out[r]["before"][task], before[task][rows], atol=1e-6, rtol=1e-5,
                                       msg=f"rank {r} logits before the step, task {task}")
            torch.testing.assert_close(out[r]["after"][task], after[task][rows], atol=1e-6, rtol=1e-5,
                                       msg=f"rank {r} logits after one step, task {task}")
