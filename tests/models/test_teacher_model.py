"""Teacher model: both embedding backends agree, history truncation, every parameter trains, LONGER causality."""

import pytest
import torch
from helpers import SCHEMA, make_batch

from recdistill.config import TeacherConfig
from recdistill.data.batch import History, offsets_from_lengths
from recdistill.models.longer import LongerEncoder
from recdistill.models.teacher import TeacherModel

CFG = dict(history_len=20, merge_k=3, recent_k=4, d_model=16, num_tokens=4, longer_dim=8, emb_dim=4)


def copy_embeddings(src: TeacherModel, dst: TeacherModel) -> None:
    """torchrec tables -> plain torch tables of the same model."""
    for f, bag in dst.embed.sparse.bags.items():
        bag.weight.data.copy_(src.embed.sparse.ebc.embedding_bags[f"t_{f}"].weight)
    for f, table in dst.embed.history.tables.items():
        table.weight.data.copy_(src.embed.history.ec.embeddings[f"h_{f}"].weight)


def test_torchrec_and_torch_backends_agree():
    torch.manual_seed(0)
    a = TeacherModel(SCHEMA, TeacherConfig(**CFG, embedding_backend="torchrec"))
    torch.manual_seed(0)
    b = TeacherModel(SCHEMA, TeacherConfig(**CFG, embedding_backend="torch"))
    b.load_state_dict({k: v for k, v in a.state_dict().items() if k in b.state_dict()}, strict=False)
    copy_embeddings(a, b)
    batch = make_batch()
    for task, out in a(batch).items():
        torch.testing.assert_close(out, b(batch)[task], msg=f"task {task}")


@pytest.mark.parametrize("kw", [{}, {"moe_experts": 3, "moe_topk": 2, "merge_kind": "transformer"},
                                {"feature_tokens": 3}, {"dense": "bins", "dense_bins": 4}])
def test_every_parameter_gets_gradient_and_outputs_finite(kw):
    torch.manual_seed(1)
    model = TeacherModel(SCHEMA, TeacherConfig(**CFG, **kw, embedding_backend="torch"))
    out = model(make_batch(seed=3))  # row 0 has an empty history
    assert all(torch.isfinite(v).all() for v in out.values())
    sum(v.sum() for v in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_dense_bins_start_as_the_linear_teacher_and_fit_edges_to_rows():
    """teacher.dense=bins is built last and zero-initialised: under one seed it computes exactly the linear teacher
    until it trains, whatever its edges; fitted edges are each dense column's quantiles; in bf16 it returns fp32."""
    batch = make_batch(n=32, seed=3)
    torch.manual_seed(0)
    lin = TeacherModel(SCHEMA, TeacherConfig(**CFG, embedding_backend="torch"))
    torch.manual_seed(0)
    bins = TeacherModel(SCHEMA, TeacherConfig(**CFG, embedding_backend="torch", dense="bins", dense_bins=4))
    assert bins.dense.dense_bins is not None and lin.dense.dense_bins is None
    rows = torch.randn(500, len(SCHEMA.dense)) * 3 + 1
    bins.fit_dense(rows)
    want = torch.quantile(rows[:, 0].double(), torch.linspace(0.005, 0.995, 5, dtype=torch.float64)).float()
    torch.testing.assert_close(bins.dense.dense_bins.edges[0], want)
    for task, out in lin(batch).items():
        torch.testing.assert_close(bins(batch)[task], out, msg=f"task {task}")
    with torch.no_grad():
        bins.dense.dense_bins.weight.normal_()
    assert not torch.allclose(bins(batch)["ctr"], lin(batch)["ctr"])
    bins.dense.bfloat16()
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in bins(batch).values())
    with torch.device("meta"):  # the sharded teacher's layout pass (train/parallelize.py build_teacher)
        TeacherModel(SCHEMA, TeacherConfig(**CFG, dense="bins"))


def test_events_older_than_history_len_are_ignored():
    torch.manual_seed(2)
    model = TeacherModel(SCHEMA, TeacherConfig(**CFG, embedding_backend="torch")).eval()
    batch = make_batch(seed=4)
    base = model(batch)["ctr"]
    lengths = batch.history.lengths
    old = torch.zeros_like(batch.history.fields["item"], dtype=torch.bool)
    for i in range(len(batch)):  # every event before the last 20 of its row
        s = int(batch.history.offsets[i])
        old[s : s + max(int(lengths[i]) - 20, 0)] = True
    assert old.any()
    item = batch.history.fields["item"].clone()
    item[old] = (item[old] + 1) % 40
    batch.history = History(batch.history.offsets, {**batch.history.fields, "item": item})
    torch.testing.assert_close(model(batch)["ctr"], base)


def test_longer_cross_attention_is_causal_for_recent_queries():
    torch.manual_seed(3)
    enc = LongerEncoder(4, 8, heads=2, layers=1, merge_k=2, recent=3).eval()  # one layer: no query mixing
    events = torch.randn(10, 4)
    offsets = offsets_from_lengths(torch.tensor([10]))
    glob = torch.randn(1, 1, 8)
    out = enc(glob, events, offsets)
    changed = events.clone()
    changed[9] += 1.0  # the newest event: merged token 4, the last recent query
    out2 = enc(glob, changed, offsets)
    torch.testing.assert_close(out2[0, 1:3], out[0, 1:3])  # recent queries at merged positions 2 and 3
    assert not torch.allclose(out2[0, 3], out[0, 3]) and not torch.allclose(out2[0, 0], out[0, 0])


def test_grouped_tokenizer_keeps_each_group_in_its_own_tokens():
    """feature_tokens: the features' tokens depend on the features only, LONGER's on its outputs only."""
    from recdistill.models.tokenmixer import GroupedTokenizer, TokenMixerLarge

    torch.manual_seed(0)
    tok = GroupedTokenizer([(10, 3), (25, 1)], 8)
    x = torch.randn(5, 35)
    y = x.clone()
    y[:, 10:] += torch.randn(5, 25)  # change the second group only
    a, b = tok(x), tok(y)
    assert a.shape == (5, 4, 8) and tok.padded_in == 12 + 25
    torch.testing.assert_close(a[:, :3], b[:, :3], rtol=0, atol=0)
    assert (a[:, 3] - b[:, 3]).abs().min() > 0
    # it is exactly one Tokenizer per group on its slice of the input
    torch.testing.assert_close(a[:, 3:], tok.parts[1](x[:, 10:]))
    model = TeacherModel(SCHEMA, TeacherConfig(**CFG, feature_tokens=1, embedding_backend="torch"))
    feats, seq = model.dense.mixer.tokenizer.parts
    assert (feats.t, seq.t) == (1, CFG["num_tokens"] - 1)
    assert model.dense.mixer.tokenizer.sizes[1] == CFG["longer_dim"] * (model.dense.n_global + CFG["recent_k"])
    with pytest.raises(ValueError, match="token groups"):
        TokenMixerLarge(35, tokens=4, dim=8, ffn_mult=2, layers=1, groups=[(10, 3), (20, 1)])
    with pytest.raises(ValueError, match="feature_tokens=4 must be below num_tokens=4"):
        TeacherConfig(**CFG, feature_tokens=4)
