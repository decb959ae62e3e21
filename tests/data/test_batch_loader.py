"""Batch / History jagged ops, sampling hash and keep decisions, BatchLoader sharding and prefetch."""

import math

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recdistill.data.batch import Batch, History, Schema, TaskSpec, offsets_from_lengths
from recdistill.data.loader import BatchLoader
from recdistill.data.sampling import SAMPLING_SALT, SamplingConfig, hash_uniform, keep_mask
from recdistill.data.source import apply_view


def rand_batch(n: int, gen: torch.Generator, day: int = 0, start: int = 0) -> Batch:
    """A batch with random jagged sparse features (lengths 0-3) and histories (lengths 0-9)."""
    la = torch.randint(0, 4, (n,), generator=gen)
    lb = torch.randint(0, 2, (n,), generator=gen)
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.randint(0, 100, (int(la.sum() + lb.sum()),), generator=gen),
                            lengths=torch.cat([la, lb]), stride=n)
    hl = torch.randint(0, 10, (n,), generator=gen)
    total = int(hl.sum())
    hist = History(offsets_from_lengths(hl), {"item": torch.randint(0, 50, (total,), generator=gen),
                                              "ts": torch.arange(total)})
    idx = torch.arange(start, start + n)
    return Batch(sample_id=(day << 40) | idx, day=torch.full((n,), day, dtype=torch.int32),
                 traffic=torch.randint(0, 2, (n,), generator=gen),
                 labels={"ctr": (torch.rand(n, generator=gen) < 0.3).float()},
                 dense=torch.randn(n, 3, generator=gen), sparse=kjt, history=hist)


def rows(b: Batch) -> list[tuple]:
    """Per-row Python view of every field (the naive reference for jagged ops)."""
    out = []
    for i in range(len(b)):
        s, e = int(b.history.offsets[i]), int(b.history.offsets[i + 1])
        out.append((int(b.sample_id[i]), int(b.traffic[i]), float(b.labels["ctr"][i]), b.dense[i].tolist(),
                    tuple(b.sparse[k].to_dense()[i].tolist() for k in b.sparse.keys()),
                    tuple(b.history.fields[k][s:e].tolist() for k in sorted(b.history.fields))))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_select_and_concat_match_per_row_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    b = rand_batch(37, gen)
    idx = torch.randperm(37, generator=gen)[:20]
    ref = rows(b)
    assert rows(b.select(idx)) == [ref[i] for i in idx.tolist()]
    mask = torch.rand(37, generator=gen) < 0.5
    assert rows(b.select(mask)) == [r for r, m in zip(ref, mask.tolist(), strict=True) if m]
    parts = [b.select(torch.arange(0, 10)), b.select(torch.arange(10, 10)), b.select(torch.arange(10, 37))]
    assert rows(Batch.concat(parts)) == ref
    assert len(b.select(torch.arange(0))) == 0


def test_history_last_keeps_most_recent():
    h = History(offsets_from_lengths(torch.tensor([5, 0, 2, 3])), {"item": torch.arange(10)})
    last = h.last(2)
    assert last.lengths.tolist() == [2, 0, 2, 2]
    assert last.fields["item"].tolist() == [3, 4, 5, 6, 8, 9]


def test_hash_uniform_is_deterministic_and_uniform():
    ids = np.arange(200_000, dtype=np.int64) | (3 << 40)
    u = hash_uniform(ids, seed=7, salt=SAMPLING_SALT)
    assert np.array_equal(u, hash_uniform(ids, seed=7, salt=SAMPLING_SALT))
    assert not np.array_equal(u, hash_uniform(ids, seed=8, salt=SAMPLING_SALT))
    counts, _ = np.histogram(u, bins=20, range=(0, 1))
    chi2 = ((counts - len(u) / 20) ** 2 / (len(u) / 20)).sum()
    assert chi2 < 50, chi2  # 19 dof: p(chi2 > 50) ~ 1e-4
    assert 0.0 <= u.min() and u.max() < 1.0


def test_keep_rates_and_nesting():
    n = 400_000
    ids = np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(0)
    pos = rng.random(n) < 0.2
    traffic = rng.integers(0, 3, n)
    teacher = SamplingConfig(name="t", r=0.5, q=1.0)
    student = SamplingConfig(name="s", r=0.1, q=0.9, q_eff=[0.9, 0.6, 0.3])
    kt, ks = keep_mask(ids, pos, traffic, teacher, 3), keep_mask(ids, pos, traffic, student, 3)
    assert not np.any(ks & ~kt), "student view must be a subset of the teacher view"
    for rate, sel in [(0.1, ~pos)] + [(q, pos & (traffic == t)) for t, q in enumerate([0.9, 0.6, 0.3])]:
        m = sel.sum()
        assert abs(ks[sel].mean() - rate) < 5 * math.sqrt(rate * (1 - rate) / m)


def test_correction_matches_formula():
    cfg = SamplingConfig(r=0.1, q=0.9, q_eff=[0.9, 0.5], b=0.25)
    got = cfg.correction(torch.tensor([0, 1, 1]), num_traffic=2)
    want = torch.tensor([math.log(0.1) - math.log(0.9) + 0.25, math.log(0.1) - math.log(0.5) + 0.25,
                         math.log(0.1) - math.log(0.5) + 0.25])
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="q_eff has 2 entries, data has 3 traffic sources"):
        cfg.q_for(3)


class ArraySource:
    """A small in-memory DataSource (real implementation of the protocol over fixed random rows)."""

    def __init__(self, rows_per_day: int = 1000, days: int = 2, sampling=None, fail_on_day: int | None = None):
        self.schema = Schema((TaskSpec("ctr"),), ("d0", "d1", "d2"), {"a": 100, "b": 100}, {"item": 50, "ts": 10**9},
                             num_traffic=2, max_history=9)
        self.sampling = sampling
        self._n, self._days, self._fail = rows_per_day, days, fail_on_day
        self._data = {d: rand_batch(rows_per_day, torch.Generator().manual_seed(d), day=d) for d in range(days)}

    def days(self):
        return list(range(self._days))

    def num_rows(self, day):
        return self._n

    def read(self, day, start, stop):
        if day == self._fail:
            raise RuntimeError(f"boom on day {day}")
        return self._data[day].select(torch.arange(start, stop))


@pytest.mark.parametrize("prefetch", [0, 3])
def test_loader_shards_partition_the_single_rank_stream(prefetch):
    src = ArraySource()
    view = SamplingConfig(name="v", r=0.5, q=1.0)
    single = list(BatchLoader(src, [0, 1], 64, view=view, prefetch=prefetch))
    # Batches never mix days; only the last batch of each day may be short.
    days = [int(b.day[0]) for b in single]
    assert all(torch.all(b.day == d) for b, d in zip(single, days, strict=True))
    last_of_day = [i == len(single) - 1 or days[i + 1] != days[i] for i in range(len(single))]
    assert all(len(b) == 64 for b, last in zip(single, last_of_day, strict=True) if not last)
    assert all(b.sampling == view for b in single)
    ids1 = torch.cat([b.sample_id for b in single])
    expect = torch.cat([apply_view(src.read(d, 0, 1000), view, 2).sample_id for d in (0, 1)])
    assert torch.equal(ids1, expect)  # order kept, view applied once
    per_rank = [torch.cat([b.sample_id for b in BatchLoader(src, [0, 1], 64, view=view, rank=r, world_size=2,
                                                            prefetch=prefetch)]) for r in range(2)]
    assert not set(per_rank[0].tolist()) & set(per_rank[1].tolist())
    assert sorted(per_rank[0].tolist() + per_rank[1].tolist()) == sorted(ids1.tolist())


def test_loader_reraises_producer_errors_on_consumer_thread():
    with pytest.raises(RuntimeError, match="boom on day 1"):
        list(BatchLoader(ArraySource(fail_on_day=1), [0, 1], 100, prefetch=2))


def test_loader_refuses_views_that_do_not_nest():
    base = SamplingConfig(name="stored", r=0.2, q=1.0)
    src = ArraySource(sampling=base)
    with pytest.raises(ValueError, match="keeps more than the data's own sampling 'stored'"):
        BatchLoader(src, [0], 10, view=SamplingConfig(name="wide", r=0.5))
    with pytest.raises(ValueError, match="different seeds do not nest"):
        BatchLoader(src, [0], 10, view=SamplingConfig(name="x", r=0.1, seed=3))
    with pytest.raises(ValueError, match=r"decides positives by task 'cvr', which is not a binary task of this data"):
        BatchLoader(src, [0], 10, view=SamplingConfig(name="v", r=0.1, task="cvr"))
    with pytest.raises(ValueError, match=r"days \[7\] not in the data source"):
        BatchLoader(src, [7], 10)
