"""MovieLens-100k from the bundled recbole copy: counts, labels, time-respecting histories, day split, tasks.

Expectations are computed independently from the raw file (numpy on the text), not from the source's arrays.
"""

import importlib.resources

import numpy as np
import pytest
import torch

from recdistill.config import load_config
from recdistill.data.movielens import MovieLensSource
from recdistill.data.parquet import ParquetSource, write_parquet

H = 50


@pytest.fixture(scope="module")
def ml():
    return MovieLensSource(load_config(None, [f"data.history_len={H}"]).data)


@pytest.fixture(scope="module")
def raw():
    """user, item, rating, ts per rating, straight from the bundled text file."""
    path = importlib.resources.files("recbole") / "dataset_example" / "ml-100k" / "ml-100k.inter"
    return np.loadtxt(str(path), skiprows=1, dtype=np.int64)


@pytest.fixture(scope="module")
def every_day(ml):
    return [ml.read(d, 0, ml.num_rows(d)) for d in ml.days()]


def test_counts_and_labels_match_the_raw_file(ml, raw, every_day):
    assert raw.shape == (100_000, 4)
    assert sum(ml.num_rows(d) for d in ml.days()) == 100_000 and len(ml.days()) == 6
    ctr = torch.cat([b.labels["ctr"] for b in every_day])
    assert int(ctr.sum()) == int((raw[:, 2] >= 4).sum())  # rating >= 4 is positive
    assert set(ctr.unique().tolist()) == {0.0, 1.0}
    rating = torch.cat([b.labels["rating"] for b in every_day])
    assert np.array_equal(np.sort(rating.numpy()), np.sort(raw[:, 2].astype(np.float32)))
    ids = torch.cat([b.sample_id for b in every_day])
    assert ids.unique().numel() == 100_000
    assert all(torch.equal(b.sample_id >> 40, b.day.long()) for b in every_day)  # day << 40 | index
    # every rating appears exactly once: the (user, item) pairs are the file's (each pair is rated once)
    pairs = torch.stack([torch.cat([b.sparse["user_id"].values() for b in every_day]),
                         torch.cat([b.sparse["item_id"].values() for b in every_day])], 1).numpy()
    assert np.array_equal(np.unique(pairs, axis=0), np.unique(raw[:, :2], axis=0))
    assert len(np.unique(raw[:, :2], axis=0)) == 100_000


def test_histories_are_earlier_ordered_and_exact(ml, raw):
    b = ml.read(3, 100, 1100)
    ts, items = b.history.fields["ts"].numpy(), b.history.fields["item"].numpy()
    users, cand = b.sparse["user_id"].values().numpy(), b.sparse["item_id"].values().numpy()
    sample_ts = {(u, i): t for u, i, _, t in raw}
    for row in range(0, len(b), 23):
        s, e = int(b.history.offsets[row]), int(b.history.offsets[row + 1])
        t0 = sample_ts[(users[row], cand[row])]
        assert (ts[s:e] < t0).all()  # strictly earlier in time
        assert (np.diff(ts[s:e]) >= 0).all()  # oldest first
        # exactly this user's H most recent ratings before the sample (items and ratings too)
        mine = raw[(raw[:, 0] == users[row]) & (raw[:, 3] < t0)]
        mine = mine[np.lexsort((mine[:, 1], mine[:, 3]))][-H:]
        assert np.array_equal(items[s:e], mine[:, 1]) and np.array_equal(ts[s:e], mine[:, 3])
        assert np.array_equal(b.history.fields["action"][s:e].numpy(), mine[:, 2])
    assert int(b.history.lengths.max()) == H and int(b.history.lengths.min()) < H


def test_eval_days_are_later_than_training_days(ml, every_day):
    eval_days = ml.days()[-1:]  # data.eval_days = 1
    train = [b for b in every_day if int(b.day[0]) not in eval_days]
    held = [b for b in every_day if int(b.day[0]) in eval_days]
    sample_ts = [torch.from_numpy(ml.ts[ml.order[ml.day_start[d] : ml.day_start[d + 1]]]) for d in ml.days()]
    assert all((a.max() < b.min()) for a, b in zip(sample_ts, sample_ts[1:], strict=False))  # strictly later days
    first_eval_ts = int(sample_ts[eval_days[0]].min())
    # no eval rating is a training sample, nor inside any training sample's history
    assert max(int(b.history.fields["ts"].max()) for b in train) < first_eval_ts
    train_pairs = {(int(u), int(i)) for b in train
                   for u, i in zip(b.sparse["user_id"].values(), b.sparse["item_id"].values(), strict=True)}
    held_pairs = {(int(u), int(i)) for b in held
                  for u, i in zip(b.sparse["user_id"].values(), b.sparse["item_id"].values(), strict=True)}
    assert len(held_pairs) == sum(len(b) for b in held) and not train_pairs & held_pairs
    # eval samples do see their users' training-day ratings as history (the point of time-ordered histories)
    assert sum(int(b.history.lengths.sum()) for b in held) > 0


def test_side_features_and_multi_genre(ml, every_day):
    b = every_day[0]
    genres = b.sparse["genres"]
    assert int(genres.lengths().max()) > 1 and int(genres.lengths().min()) >= 1  # several genres per movie
    first = genres.values()[genres.offsets()[:-1]]
    assert torch.equal(first, b.sparse["item_cat"].values())
    for k, card in ml.schema.sparse.items():
        v = b.sparse[k].values()
        assert int(v.min()) >= 0 and int(v.max()) < card, k
    assert ml.schema.sparse["user_id"] == 944 and ml.schema.num_traffic == 1


def test_tasks_from_config():
    base = ["data.history_len=8"]
    only = MovieLensSource(load_config(None, [*base, "data.tasks=[{name: ctr, kind: binary}]"]).data)
    assert only.schema.task_names == ["ctr"] and list(only.read(0, 0, 4).labels) == ["ctr"]
    with pytest.raises(ValueError, match=r"MovieLens-100k has no task \['cvr \(binary\)'\]"):
        MovieLensSource(load_config(None, [*base, "data.tasks=[{name: ctr}, {name: cvr}]"]).data)
    fine = MovieLensSource(load_config(None, [*base, "data.num_days=1000"]).data)  # many cuts: ties stay together
    ts = fine.ts[fine.order]
    assert all(ts[fine.day_start[d] - 1] < ts[fine.day_start[d]] for d in range(1, 1000))
    assert sum(fine.num_rows(d) for d in fine.days()) == 100_000 and min(map(fine.num_rows, fine.days())) > 0


def test_parquet_round_trip_of_movielens(ml, tmp_path):
    """The real data through the Parquet layout: multi-id `genres` becomes list<int64> and reads back equal."""
    write_parquet(ml, str(tmp_path / "ml"), days=[5], row_group_rows=5000, progress=False)
    src = ParquetSource(str(tmp_path / "ml"), history_len=20)
    assert src.schema.tasks == ml.schema.tasks and src.num_rows(5) == ml.num_rows(5)
    a, b = ml.read(5, 4000, 6000), src.read(5, 4000, 6000)
    assert torch.equal(a.sample_id, b.sample_id) and torch.equal(a.labels["rating"], b.labels["rating"])
    assert torch.equal(a.sparse["genres"].values(), b.sparse["genres"].values())
    assert torch.equal(a.sparse["genres"].lengths(), b.sparse["genres"].lengths())
    assert torch.equal(a.history.last(20).fields["item"], b.history.fields["item"])
