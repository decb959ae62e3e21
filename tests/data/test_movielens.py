"""MovieLens-100k from the bundled recbole copy: counts, labels, time-respecting histories, day split."""

import importlib.resources

import numpy as np
import pytest
import torch

from recdistill.config import load_config
from recdistill.data.movielens import MovieLensSource


@pytest.fixture(scope="module")
def ml():
    return MovieLensSource(load_config(None, ["data.history_len=50"]).data)


def raw_ratings():
    text = (importlib.resources.files("recbole") / "dataset_example" / "ml-100k" / "ml-100k.inter").read_text()
    return np.array([[float(x) for x in line.split("\t")] for line in text.splitlines()[1:]])


def test_counts_and_labels_match_the_raw_file(ml):
    raw = raw_ratings()
    assert len(raw) == 100_000
    assert sum(ml.num_rows(d) for d in ml.days()) == 100_000
    batches = [ml.read(d, 0, ml.num_rows(d)) for d in ml.days()]
    pos = sum(float(b.labels["ctr"].sum()) for b in batches)
    assert pos == float((raw[:, 2] >= 4).sum())  # rating >= 4 is positive
    ids = torch.cat([b.sample_id for b in batches])
    assert ids.unique().numel() == 100_000


def test_histories_are_earlier_ordered_and_bounded(ml):
    b = ml.read(3, 100, 1100)
    ts = b.history.fields["ts"]
    sample_ts = torch.from_numpy(ml.ts[ml.order[ml.day_start[3] + 100 : ml.day_start[3] + 1100]])
    users = b.sparse["user_id"].values()
    for i in range(0, len(b), 37):
        s, e = int(b.history.offsets[i]), int(b.history.offsets[i + 1])
        assert e - s <= 50
        assert (ts[s:e] < sample_ts[i]).all()  # strictly earlier in time
        assert (ts[s:e].diff() >= 0).all()  # oldest first
        # and they are exactly this user's latest ratings before the sample
        mine = np.sort(ml.ts[(ml.user == int(users[i])) & (ml.ts < int(sample_ts[i]))])[-50:]
        assert np.array_equal(np.sort(ts[s:e].numpy()), mine)
    assert int(b.history.lengths.max()) == 50 and int(b.history.lengths.min()) < 50


def test_days_are_time_ordered_buckets(ml):
    last_train = ml.read(4, ml.num_rows(4) - 1, ml.num_rows(4))
    first_eval = ml.read(5, 0, 1)
    t_train = int(ml.ts[ml.order[ml.day_start[5] - 1]])
    t_eval = int(ml.ts[ml.order[ml.day_start[5]]])
    assert t_train <= t_eval and int(last_train.day[0]) == 4 and int(first_eval.day[0]) == 5
    assert [t.name for t in ml.schema.tasks] == ["ctr", "rating"]
    assert ml.schema.num_traffic == 1 and ml.schema.sparse["user_id"] == 944
