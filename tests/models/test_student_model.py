"""Student model: shapes, tower gradient isolation, recent-history padding, feature subsets."""

import pytest
import torch
from helpers import SCHEMA, make_batch

from recdistill.distill.losses import distill_loss, task_loss
from recdistill.models.student import StudentModel, recent_padded


def grads(module: torch.nn.Module) -> list[tuple[str, bool]]:
    return [(n, p.grad is not None and bool(p.grad.abs().sum() > 0)) for n, p in module.named_parameters()]


def test_forward_shapes_and_variants():
    b = make_batch()
    out = StudentModel(SCHEMA, history_len=8)(b)
    assert set(out.main) == {"ctr", "watch_time"} and out.main["ctr"].shape == (9,)
    assert out.aux is not None and out.aux["ctr"].shape == (9,)
    assert torch.isfinite(out.main["ctr"]).all()  # the empty-history row too
    assert StudentModel(SCHEMA, decoupled=False)(b).aux is None


def test_distill_loss_alone_reaches_backbone_and_aux_not_main():
    torch.manual_seed(0)
    model, b = StudentModel(SCHEMA, history_len=8), make_batch()
    out = model(b)
    teacher = torch.randn(9)
    distill_loss(teacher, out.aux["ctr"], torch.ones(9, dtype=torch.bool)).backward()
    main = dict(grads(model.main))
    assert not any(main.values()), f"main tower got gradient: {[n for n, g in main.items() if g]}"
    assert all(g for n, g in grads(model.backbone)), "every backbone parameter needs a gradient"
    aux = dict(grads(model.aux))
    assert aux["body.0.weight"] and aux["heads.ctr.weight"]
    assert not aux["heads.watch_time.weight"]  # only the distilled task's head
    assert dict(grads(model.ebc))["embedding_bags.t_user_id.weight"]


def test_task_loss_on_main_leaves_aux_untouched():
    model, b = StudentModel(SCHEMA, history_len=8), make_batch(seed=1)
    out = model(b)
    task_loss(out.main, b.labels, {"ctr": "binary", "watch_time": "continuous"}).backward()
    assert not any(g for _, g in grads(model.aux))
    assert all(g for _, g in grads(model.main))


@pytest.mark.parametrize("n", [1, 5, 40])
def test_recent_padded_matches_per_row(n):
    b = make_batch(seed=2)
    ids, mask = recent_padded(b.history, n, ("item", "cat"))
    for i in range(len(b)):
        s, e = int(b.history.offsets[i]), int(b.history.offsets[i + 1])
        want = b.history.fields["item"][s:e][-n:].tolist()
        assert ids["item"][i][mask[i]].tolist() == want
        assert mask[i].tolist() == [False] * (n - len(want)) + [True] * len(want)  # right-aligned
        assert (ids["item"][i][~mask[i]] == 0).all()


def test_feature_subset_student():
    b = make_batch()
    small = StudentModel(SCHEMA, features=["user_id"], history_len=4)
    assert list(small.ebc.embedding_bag_configs()[0].feature_names) == ["user_id"]
    assert small.target_feature is None  # no item_id: the history mean is the query
    assert small(b).main["ctr"].shape == (9,)
    with pytest.raises(ValueError, match=r"student features \['nope'\] are not in the data"):
        StudentModel(SCHEMA, features=["nope"])


def test_match_statistics_against_a_per_row_count():
    from recdistill.models.match import MATCH_WINDOWS, target_match_padded

    b = make_batch(seed=3)
    n = 20
    ids, mask = recent_padded(b.history, n, ("cat",))
    cand = torch.arange(len(b)) % 7
    got = target_match_padded(cand, ids["cat"], mask)
    for i in range(len(b)):
        cats = b.history.fields["cat"][b.history.offsets[i]:b.history.offsets[i + 1]][-n:].tolist()
        want = []
        for w in (*MATCH_WINDOWS, n):
            last = cats[-w:]
            hits = sum(c == int(cand[i]) for c in last)
            want += [hits / max(len(last), 1), float(torch.log1p(torch.tensor(float(hits))))]
        want.append(float(torch.log1p(torch.tensor(float(len(cats))))))
        torch.testing.assert_close(got[i], torch.tensor(want), msg=f"row {i}")


def test_pooling_and_target_ids_are_the_ebc_and_kjt_ones_exactly():
    """Training and serving pool through `StudentModel.pool` on plain tensors: it must give what the
    EmbeddingBagCollection gives on the KeyedJaggedTensor, bit for bit, with multi-id and empty rows."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recdistill.models.student import first_id, model_inputs

    torch.manual_seed(0)
    model, b = StudentModel(SCHEMA, history_len=8), make_batch(n=12, seed=4)
    lengths = torch.cat([torch.arange(12) % 3, torch.ones(12, dtype=torch.int64), torch.arange(12) % 2])
    values = torch.cat([torch.arange(int(lengths[:12].sum())) % 50, b.sparse["item_id"].values(),
                        torch.arange(6) % 7])
    b.sparse = KeyedJaggedTensor(keys=list(SCHEMA.sparse), values=values, lengths=lengths)
    vals, lens, *_ = model_inputs(model, b)
    want = model.ebc(b.sparse).to_dict()
    got = model.pool(vals, lens)
    for f in model.features:
        assert torch.equal(got[f], want[f]), f
        assert torch.equal(first_id(vals[f], lens[f]), b.sparse[f].to_padded_dense(1).squeeze(1)), f


def test_long_history_summary_is_a_served_input_the_program_follows(tmp_path):
    """With summary_len the student reads a per-user category-count vector of the last summary_len events (not the
    events themselves): the exported program takes it as an input and follows the model on another batch size;
    the summary changes the predictions; the spec names it, so `predict` can build it."""
    from recdistill.models.student import ServedStudent, serving_inputs
    from recdistill.serve import ServingSpec, export_served, load_served

    torch.manual_seed(0)
    model = StudentModel(SCHEMA, emb_dim=4, hidden=8, history_len=3, summary_len=20).eval()
    spec = ServingSpec.of(model, SCHEMA)
    assert (spec.summary_len, spec.summary_field, spec.summary_cats) == (20, "cat", SCHEMA.history["cat"])
    served = ServedStudent(model, torch.zeros(SCHEMA.num_traffic), {"ctr": "binary", "watch_time": "continuous"})
    loaded = load_served(export_served(served, spec, tmp_path / "student.pt2"))
    batch = make_batch(n=13, seed=5)
    inputs = serving_inputs(model, batch)
    assert inputs[5].shape == (13, SCHEMA.history["cat"]) and inputs[5].sum(1).max() == 20  # capped at the window
    expect = served(*inputs)
    torch.testing.assert_close(loaded(batch), expect)
    blank = (*inputs[:5], torch.zeros_like(inputs[5]), inputs[6])
    assert not torch.allclose(served(*blank), expect)
    with pytest.raises(ValueError, match="summary_len=5 needs the history's category field"):
        StudentModel(SCHEMA, features=["user_id"], summary_len=5)


def test_hint_head_reaches_the_backbone_and_is_not_served():
    """The representation hint (student.hint_weight) trains a head on the backbone: its loss moves the backbone and
    the head, never a tower, and the served view holds neither the aux tower nor the head."""
    torch.manual_seed(0)
    model, b = StudentModel(SCHEMA, history_len=8, hint_dim=5), make_batch()
    out = model(b)
    assert out.hint.shape == (9, 5) and StudentModel(SCHEMA, history_len=8)(b).hint is None
    out.hint.square().sum().backward()
    assert all(g for _, g in grads(model.hint)) and any(g for _, g in grads(model.backbone))
    assert not any(g for _, g in grads(model.main)) and not any(g for _, g in grads(model.aux))
    served = model.without_aux()
    assert served.hint is None and not any(n.startswith(("hint.", "aux.")) for n, _ in served.named_parameters())
    assert model.hint is not None  # the view leaves the trained model whole
    without = sum(p.numel() for p in StudentModel(SCHEMA, history_len=8).without_aux().parameters())
    assert sum(p.numel() for p in served.parameters()) == without
