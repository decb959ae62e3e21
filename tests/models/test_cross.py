"""Crossed features: the plan follows vocabulary sizes only, ids are exact mixed-radix codes (hashed only past
the bucket cap), rows without an id get "missing", and a teacher with crosses runs on both backends."""

import math

import pytest
import torch
from helpers import SCHEMA, make_batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recdistill.config import TeacherConfig
from recdistill.models.cross import cross_ids, crossed_kjt, first_ids, plan_crosses
from recdistill.models.teacher import TeacherModel

CARD = {"user_id": 5000, "seg": 8, "slot": 4, "tags": 256, "cat": 64}


def test_auto_plan_crosses_every_pair_and_triple_of_small_features_only():
    crosses = plan_crosses(CARD, "auto", max_vocab=100, order=3, buckets=1 << 16)
    assert [c.fields for c in crosses] == [("cat", "seg"), ("cat", "slot"), ("seg", "slot"), ("cat", "seg", "slot")]
    assert crosses[-1].radices == (65, 9, 5) and crosses[-1].size == 65 * 9 * 5 and not crosses[-1].hashed
    assert plan_crosses(CARD, "auto", max_vocab=100, order=2, buckets=1 << 16)[-1].fields == ("seg", "slot")
    assert plan_crosses(CARD, "none", max_vocab=100, order=3, buckets=1 << 16) == []
    capped = plan_crosses(CARD, [["user_id", "cat"]], max_vocab=100, order=3, buckets=1000)
    assert capped[0].fields == ("cat", "user_id") and capped[0].size == 1000 and capped[0].hashed
    with pytest.raises(ValueError, match="nosuch"):
        plan_crosses(CARD, [["cat", "nosuch"]], max_vocab=100, order=3, buckets=10)


def test_cross_ids_are_distinct_exact_codes_and_hashing_stays_in_range():
    (c,) = plan_crosses({"a": 3, "b": 4}, [["a", "b"]], max_vocab=100, order=2, buckets=1 << 16)
    a, b = torch.arange(4).repeat_interleave(5), torch.arange(5).repeat(4)  # every pair incl. "missing" (3, 4)
    ids = cross_ids(c, {"a": a, "b": b})
    assert ids.unique().numel() == c.size == 20 and int(ids.min()) == 0 and int(ids.max()) == 19
    (h,) = plan_crosses({"a": 3, "b": 4}, [["a", "b"]], max_vocab=100, order=2, buckets=7)
    hashed = cross_ids(h, {"a": a, "b": b})
    assert h.hashed and int(hashed.min()) >= 0 and int(hashed.max()) < 7 and hashed.unique().numel() > 4


def test_first_ids_take_the_first_id_and_mark_rows_without_one():
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([2, 1, 0, 3, 3]),
                            lengths=torch.tensor([1, 0, 2, 1, 1, 0]))  # a: [2] [] [1 0]; b: [3] [3] []
    ids = first_ids(kjt, {"a": 3, "b": 4}, ["a", "b"])
    assert ids["a"].tolist() == [2, 3, 1] and ids["b"].tolist() == [3, 3, 4]
    out = crossed_kjt(kjt, plan_crosses({"a": 3, "b": 4}, "auto", max_vocab=10, order=2, buckets=100),
                      {"a": 3, "b": 4})
    assert out.keys() == ["a", "b", "cross__a__b"]
    assert out["cross__a__b"].values().tolist() == [2 * 5 + 3, 3 * 5 + 3, 1 * 5 + 4]


@pytest.mark.parametrize("backend", ["torchrec", "torch"])
def test_teacher_with_crosses_trains_every_table(backend):
    cfg = TeacherConfig(history_len=20, merge_k=3, recent_k=4, d_model=16, num_tokens=4, longer_dim=8, emb_dim=4,
                        embedding_backend=backend, crosses="auto", cross_max_vocab=45)
    torch.manual_seed(0)
    model = TeacherModel(SCHEMA, cfg)
    names = [c.name for c in model.embed.crosses]
    assert names == ["cross__item_cat__item_id"]  # user_id has 50 ids: not crossed
    out = model(make_batch(seed=3))
    sum(v.sum() for v in out.values()).backward()
    if backend == "torch":
        table = model.embed.sparse.bags[names[0]].weight
    else:
        table = model.embed.sparse.ebc.embedding_bags[f"t_{names[0]}"].weight
    assert table.shape[0] == math.prod([41, 8]) and table.grad is not None and table.grad.abs().sum() > 0


def test_student_crosses_are_computed_inside_the_exported_program(tmp_path):
    """The served program takes the raw features and computes the cross ids itself: exported with a dynamic batch,
    it gives the training model's outputs on another batch size, empty feature rows included."""
    from recdistill.models.student import ServedStudent, StudentModel, serving_inputs
    from recdistill.serve import ServingSpec, export_served, load_served

    torch.manual_seed(0)
    crosses = plan_crosses(SCHEMA.sparse, "auto", max_vocab=45, order=2, buckets=100)
    model = StudentModel(SCHEMA, emb_dim=4, hidden=8, history_len=5, crosses=crosses).eval()
    assert [c.name for c in model.crosses] == ["cross__item_cat__item_id"] and crosses[0].hashed
    served = ServedStudent(model, torch.zeros(SCHEMA.num_traffic), {"ctr": "binary", "watch_time": "continuous"})
    path = export_served(served, ServingSpec.of(model, SCHEMA), tmp_path / "student.pt2")
    loaded = load_served(path)
    batch = make_batch(n=13, seed=5)
    expect = served(*serving_inputs(model, batch))
    torch.testing.assert_close(loaded(batch), expect)
    with torch.no_grad():  # the cross table matters: zeroing it changes the predictions
        model.ebc.embedding_bags["t_cross__item_cat__item_id"].weight.zero_()
    assert not torch.allclose(served(*serving_inputs(model, batch)), expect)
