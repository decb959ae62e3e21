"""The served student end to end: export (any schema), `recdistill predict` through the real CLI entry, and its
predictions against the trainer's own evaluation predictions on the same rows."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import SCHEMA, make_batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recdistill.cli import main
from recdistill.config import load_config
from recdistill.data.batch import Schema
from recdistill.data.parquet import write_parquet
from recdistill.models.student import ServedStudent, StudentModel
from recdistill.serve import EXAMPLE_BATCH, ServingSpec, export_served, load_served
from recdistill.train.student import run_student

# A base student (no teacher signals needed), exported; small enough to train in seconds.
STUDENT = ["student.towers=single", "student.tower_loss=task", "student.export=true", "tracking.progress=false",
           "data.batch_size=64", "data.prefetch=0"]
WORLD = ["data.num_days=3", "data.samples_per_day=1000", "data.history_len=32", "data.world.num_users=400",
         "data.world.num_items=800", "student.history_len=16"]
# The program runs the same aten ops as the eager model on the same weights, but in batches of another size, where
# BLAS may block float32 sums differently: agreement to rounding, far below any difference that would matter.
RTOL, ATOL = 1e-5, 1e-6
TAGS = 5  # cardinality of the multi-id feature


def with_tags(b, seed: int, most: int = 3):
    """`b` with a multi-id feature 'tags': 0 to `most` ids per row, so some rows have none."""
    g = torch.Generator().manual_seed(seed)
    n = len(b)
    tag_len = torch.randint(0, most + 1, (n,), generator=g)
    jts = b.sparse.to_dict()
    keys = [*b.sparse.keys(), "tags"]
    b.sparse = KeyedJaggedTensor(
        keys=keys, stride=n, lengths=torch.cat([*(jts[k].lengths() for k in b.sparse.keys()), tag_len]),
        values=torch.cat([*(jts[k].values() for k in b.sparse.keys()),
                          torch.randint(0, TAGS, (int(tag_len.sum()),), generator=g)]))
    return b


def parquet_days(out, *, tags: bool, drop: str | None = None, days: int = 3, rows: int = 300,
                 dense_reversed: bool = False) -> str:
    """A Parquet directory of `days` days of random rows in the helpers' SCHEMA (single-id sparse features),
    plus the list<int64> feature 'tags' when asked, minus sparse feature `drop`, with the dense columns in reverse
    order when asked (same values under the same names)."""
    batches = []
    for d in range(days):
        b = make_batch(n=rows, seed=d)
        b.sample_id = torch.arange(rows) + d * 10_000
        b.day = torch.full((rows,), d, dtype=torch.int32)
        b.traffic = torch.arange(rows) % SCHEMA.num_traffic
        if tags:
            b = with_tags(b, seed=100 + d)
        if dense_reversed:
            b.dense = b.dense.flip(1)
        if drop:
            jts = b.sparse.to_dict()
            keep = [k for k in b.sparse.keys() if k != drop]
            b.sparse = KeyedJaggedTensor.from_jt_dict({k: jts[k] for k in keep})
        batches.append(b)
    sparse = {k: v for k, v in SCHEMA.sparse.items() if k != drop} | ({"tags": TAGS} if tags else {})
    dense = SCHEMA.dense[::-1] if dense_reversed else SCHEMA.dense
    schema = Schema(tasks=SCHEMA.tasks, dense=dense, sparse=sparse, history=SCHEMA.history,
                    num_traffic=SCHEMA.num_traffic, max_history=SCHEMA.max_history)
    write_parquet(batches, str(out), schema=schema, list_sparse=["tags"] if tags else (), progress=False)
    return str(out)


def train(tmp_path, sets: list[str]) -> tuple[dict, dict]:
    """Train and export a student; its summary and its evaluation predictions (eval_preds.npz)."""
    summary = run_student(load_config(None, STUDENT + sets), tmp_path / "run", name="s")
    return summary, dict(np.load(tmp_path / "run" / "s.eval_preds.npz"))


def assert_same_predictions(out, preds: dict, tasks: list[str]) -> None:
    got = pq.read_table(out).to_pydict()
    assert list(got) == ["sample_id", *(f"pred_{t}" for t in tasks)]
    order = np.argsort(got["sample_id"])
    ids = np.asarray(got["sample_id"])[order]
    want_order = np.argsort(preds["sample_id"])
    np.testing.assert_array_equal(ids, preds["sample_id"][want_order])  # every evaluated row, once
    for t in tasks:
        np.testing.assert_allclose(np.asarray(got[f"pred_{t}"])[order], preds[f"pred_{t}"][want_order],
                                   rtol=RTOL, atol=ATOL, err_msg=t)


def test_predict_on_the_synthetic_world_equals_the_trainers_eval(tmp_path):
    summary, preds = train(tmp_path, WORLD)
    assert summary["export/format"] == "torch.export"
    out = tmp_path / "preds.parquet"
    args = ["predict", "--model", summary["export/path"], "--out", str(out), "--batch-size", "100"]
    assert main(args + [a for s in STUDENT + WORLD for a in ("--set", s)]) == 0
    assert_same_predictions(out, preds, [k[len("pred_"):] for k in preds if k.startswith("pred_")])


@pytest.mark.parametrize("tags,history_len", [(False, 8), (True, 8), (False, 0)],
                         ids=["single-id", "multi-id", "no-history"])
def test_predict_on_parquet_equals_the_trainers_eval(tmp_path, tags, history_len):
    data = parquet_days(tmp_path / "data", tags=tags)
    sets = ["data.source=parquet", f"data.path={data}", f"student.history_len={history_len}"]
    summary, preds = train(tmp_path, sets)
    spec = json.loads((tmp_path / "run" / "s_main_tower.json").read_text())
    assert spec["hist_fields"] == ([] if history_len == 0 else ["item", "cat"])
    assert spec["features"] == list(SCHEMA.sparse) + (["tags"] if tags else [])
    out = tmp_path / "out" / "preds.parquet"
    # a batch size that is neither the traced example's nor the trainer's, with a short last batch
    assert main(["predict", "--model", summary["export/path"], "--data", data, "--out", str(out),
                 "--batch-size", "7"]) == 0
    assert_same_predictions(out, preds, ["ctr", "watch_time"])
    assert len(preds["sample_id"]) == 300  # the last day: all of its rows


def test_dense_by_name_and_missing_feature_or_sidecar_are_errors_naming_them(tmp_path, capsys):
    data = parquet_days(tmp_path / "data", tags=False, days=2, rows=50)
    summary, _ = train(tmp_path, ["data.source=parquet", f"data.path={data}", "student.history_len=4"])
    model = summary["export/path"]
    # the same rows with the dense columns stored in the other order: matched by name, the same predictions
    reordered = parquet_days(tmp_path / "reordered", tags=False, days=2, rows=50, dense_reversed=True)
    outs = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    for d, out in zip((data, reordered), outs, strict=True):
        assert main(["predict", "--model", model, "--data", d, "--days", "0,1", "--out", str(out)]) == 0
    a, b = (pq.read_table(o).to_pydict() for o in outs)
    assert len(a["sample_id"]) == 100 and a == b
    lacking = parquet_days(tmp_path / "lacking", tags=False, drop="item_cat", days=1, rows=20)
    out = tmp_path / "p.parquet"
    assert main(["predict", "--model", model, "--data", lacking, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "sparse feature 'item_cat'" in err and "lacking/day=0/part-00000.parquet" in err, err
    assert not list(tmp_path.glob("p.parquet*"))  # nothing written, not even a temporary file
    (tmp_path / "run" / "s_main_tower.json").unlink()
    assert main(["predict", "--model", model, "--data", data, "--out", str(out)]) == 1
    assert "s_main_tower.json: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("history_len", [6, 0])
def test_exported_program_follows_the_model_on_any_batch(tmp_path, history_len):
    """Untrained weights, batches of 1 row, of the traced size, and larger; a multi-id feature with no id at all
    in some batches: the reloaded program equals the model's main tower to rounding."""
    schema = Schema(tasks=SCHEMA.tasks, dense=SCHEMA.dense, sparse={**SCHEMA.sparse, "tags": TAGS},
                    history=SCHEMA.history, num_traffic=2, max_history=30)
    torch.manual_seed(0)
    model = StudentModel(schema, history_len=history_len).eval()
    kinds = {t.name: t.kind for t in schema.tasks}
    correction = torch.tensor([0.4, -0.7])
    served = ServedStudent(model, correction, kinds).eval()
    loaded = load_served(export_served(served, ServingSpec.of(model, schema), tmp_path / "m"))
    for n in (1, EXAMPLE_BATCH, 41):
        b = with_tags(make_batch(n=n, seed=n), seed=n, most=0 if n == 1 else 3)  # n == 1: no tag, 0 values
        b.traffic = torch.arange(n) % 2
        with torch.no_grad():
            z = model(b).main
        want = torch.stack([torch.sigmoid(z["ctr"] + correction[b.traffic]), torch.expm1(z["watch_time"])], 1)
        torch.testing.assert_close(loaded(b), want, rtol=RTOL, atol=ATOL, msg=f"batch of {n}")
