"""Counting features (data.counts): equal to counts made by hand over the earlier days' rows, causal, the same through
a view, by sample id, after pickling (loader workers) and from Parquet; only groups that count something are kept."""

import os
import pickle
from collections import Counter

import numpy as np
import pytest
import torch

from recdistill.config import load_config
from recdistill.data.counts import CountedSource
from recdistill.data.parquet import ParquetSource, write_parquet
from recdistill.data.roles import resolve_roles
from recdistill.data.source import build_source

SETS = ["data.num_days=4", "data.samples_per_day=3000", "data.history_len=16", "data.world.num_users=60",
        "data.world.num_items=300", "data.world.num_categories=12"]


@pytest.fixture(scope="module")
def counted():
    cfg = load_config(None, [*SETS, "data.counts=true", "data.count_scale=log"])  # the counts as they are
    return cfg, build_source(cfg.data)


def hand_counts(inner, day, group, window=None):
    """Counter of the group's id tuples over every row of the days before `day` (the last `window` of them only if
    given), from full reads."""
    c = Counter()
    for d in inner.days():
        if d >= day or (window and d < day - window):
            continue
        b = inner.read(d, 0, inner.num_rows(d))
        ids = [b.sparse[k].values().numpy() for k in group]  # single-valued: one id per row
        c.update(zip(*ids, strict=True))
    return c


def test_counts_equal_hand_counts_over_earlier_days(counted):
    cfg, src = counted
    inner = src.inner
    names = list(src.schema.dense)
    assert names[:len(inner.schema.dense)] == list(inner.schema.dense)
    for day in (0, 2, 3):
        b = src.read(day, 100, 700)
        plain = inner.read(day, 100, 700)
        assert torch.equal(b.dense[:, :len(inner.schema.dense)], plain.dense)
        for group in src.tables.groups:
            hand = hand_counts(inner, day, group)
            ids = list(zip(*[plain.sparse[k].values().numpy() for k in group], strict=True))
            want = np.log1p([hand[i] for i in ids]).astype(np.float32)
            got = b.dense[:, names.index("count_" + "_x_".join(group))].numpy()
            np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"{group} day {day}")
        if day == 0:
            assert not b.dense[:, len(inner.schema.dense):].any()  # nothing before the first day


def test_groups_keep_only_what_counts_something(counted):
    _, src = counted
    groups = src.tables.groups
    assert ("user_id",) in groups and ("item_id",) in groups and ("user_id", "item_cat") in groups
    assert ("user_id", "user_segment") not in groups  # a function of the user: its count is the user's own
    assert not any("item_tags" in g for g in groups)  # multi-valued: not counted
    assert ("user_id", "item_id") not in groups  # the item is counted alone, never crossed with the user


def test_view_ids_and_pickle_give_the_same_rows(counted):
    cfg, src = counted
    full = src.read(2, 0, 2000)
    viewed = src.read(2, 0, 2000, view=cfg.sampling.student)
    assert 0 < len(viewed) < len(full)
    pos = np.searchsorted(full.sample_id.numpy(), viewed.sample_id.numpy())
    assert torch.equal(viewed.dense, full.dense[torch.from_numpy(pos)])
    ids = np.concatenate([viewed.sample_id.numpy()[:50], src.read(1, 0, 30).sample_id.numpy()])  # two days mixed
    by_id = src.read_ids(ids)
    assert torch.equal(by_id.dense[:50], viewed.dense[:50])
    assert torch.equal(by_id.dense[50:], src.read(1, 0, 30).dense)
    clone = pickle.loads(pickle.dumps(src))
    assert torch.equal(clone.read(3, 10, 90).dense, src.read(3, 10, 90).dense)
    assert clone.days() == src.days() and clone.num_rows(1) == 3000


def test_parquet_counts_equal_the_worlds(counted, tmp_path):
    cfg, src = counted
    write_parquet(src.inner, str(tmp_path / "pq"), progress=False)
    pq_src = ParquetSource(str(tmp_path / "pq"))
    counted_pq = CountedSource(pq_src, resolve_roles(cfg.data.roles, pq_src))
    assert counted_pq.tables.groups == src.tables.groups
    assert counted_pq.schema.dense == src.schema.dense
    assert torch.equal(counted_pq.read(3, 0, 500).dense, src.read(3, 0, 500).dense)


def test_off_by_default_and_counts_of_a_source_without_sparse_ids(counted):
    cfg, src = counted
    plain = build_source(load_config(None, SETS).data)
    assert not isinstance(plain, CountedSource) and plain.schema.dense == src.inner.schema.dense

    class NoShortcut:  # a registered source with only the protocol: counted from full reads
        def __init__(self, inner):
            self.inner, self.schema, self.sampling = inner, inner.schema, inner.sampling

        def days(self):
            return self.inner.days()

        def num_rows(self, day):
            return self.inner.num_rows(day)

        def read(self, day, start, stop, view=None):
            return self.inner.read(day, start, stop, view=view)

    other = CountedSource(NoShortcut(src.inner), resolve_roles(cfg.data.roles, src.inner))
    assert other.tables.groups == src.tables.groups
    assert torch.equal(other.read(2, 0, 400).dense, src.read(2, 0, 400).dense)
    with pytest.raises(AttributeError):
        other.read_ids(np.array([0]))
    assert not hasattr(other, "read_ids")


def test_export_writes_the_stored_rows_and_counts_apply_on_reading(counted, tmp_path):
    from recdistill.cli import main

    cfg, src = counted
    out = tmp_path / "exported"
    args = [a for s in [*SETS, "data.counts=true", "tracking.progress=false"] for a in ("--set", s)]
    assert main(["data", "export", str(out), *args]) == 0
    back = ParquetSource(str(out))
    assert back.schema.dense == src.inner.schema.dense  # no count column written: they are derived, not data
    cfg_pq = load_config(None, [*SETS, "data.counts=true", "data.count_scale=log", "data.source=parquet",
                                f"data.path={out}"])
    again = build_source(cfg_pq.data)
    assert again.schema.dense == src.schema.dense
    assert torch.equal(again.read(2, 0, 300).dense, src.read(2, 0, 300).dense)


def test_loader_workers_carry_the_counts(counted):
    from recdistill.data.loader import BatchLoader

    cfg, src = counted
    kw = dict(view=cfg.sampling.teacher, chunk_rows=500)
    inline = [b.dense for b in BatchLoader(src, [1, 2], 128, **kw)]
    spawned = [b.dense for b in BatchLoader(src, [1, 2], 128, workers=2, **kw)]
    assert len(inline) == len(spawned) > 10
    assert inline[0].shape[1] == len(src.schema.dense)
    assert all(torch.equal(a, b) for a, b in zip(inline, spawned, strict=True))


def test_standard_scale_gives_unit_columns_over_the_stored_rows(counted):
    cfg, src = counted
    std = build_source(load_config(None, [*SETS, "data.counts=true", "data.count_scale=standard"]).data)
    k = len(src.inner.schema.dense)
    cols = torch.cat([std.read(d, 0, std.num_rows(d)).dense[:, k:] for d in std.days()]).double()
    assert torch.allclose(cols.mean(0), torch.zeros(cols.shape[1], dtype=torch.float64), atol=1e-5)
    assert torch.allclose(cols.std(0, correction=0), torch.ones(cols.shape[1], dtype=torch.float64), atol=1e-5)
    log_cols = src.read(3, 0, 800).dense[:, k:]  # the same counts, an affine map per column
    t = std.tables
    shift = torch.tensor([t.shift[g] for g in t.groups]).float()
    scale = torch.tensor([t.scale[g] for g in t.groups]).float()
    assert torch.allclose(std.read(3, 0, 800).dense[:, k:], (log_cols - shift) / scale, atol=1e-5)
    assert not src.tables.shift and std.tables.groups == src.tables.groups


def test_window_counts_only_the_last_days(counted):
    _, src = counted
    win = build_source(load_config(None, [*SETS, "data.counts=true", "data.count_window=2",
                                          "data.count_scale=standard"]).data)
    k = len(src.inner.schema.dense)
    assert win.tables.groups == src.tables.groups and "the last 2 days" in win.describe()
    t = win.tables
    for day in (1, 3):  # day 1: one day before it, fewer than the window; day 3: days 1 and 2, not day 0
        b, plain = win.read(day, 0, 500), src.inner.read(day, 0, 500)
        for j, group in enumerate(t.groups):
            hand = hand_counts(src.inner, day, group, window=2)
            ids = list(zip(*[plain.sparse[c].values().numpy() for c in group], strict=True))
            want = (np.log1p([hand[i] for i in ids]) - t.shift[group]) / t.scale[group]
            np.testing.assert_allclose(b.dense[:, k + j].numpy(), want, rtol=1e-5, atol=1e-5, err_msg=f"{group} {day}")
    assert not torch.equal(win.read(3, 0, 500).dense, build_source(load_config(None, [
        *SETS, "data.counts=true", "data.count_scale=standard"]).data).read(3, 0, 500).dense)
    cols = torch.cat([win.read(d, 0, win.num_rows(d)).dense[:, k:] for d in win.days()]).double()
    assert torch.allclose(cols.mean(0), torch.zeros(cols.shape[1], dtype=torch.float64), atol=1e-5)
    assert torch.allclose(cols.std(0, correction=0), torch.ones(cols.shape[1], dtype=torch.float64), atol=1e-5)


def test_first_ids_of_jagged_rows():
    from recdistill.data.batch import first_ids

    got = first_ids(torch.tensor([7, 8, 9, 4]), torch.tensor([2, 0, 1, 1, 0]))
    assert got.tolist() == [7, -1, 9, 4, -1]
    assert first_ids(torch.tensor([], dtype=torch.int64), torch.tensor([0, 0])).tolist() == [-1, -1]


def test_count_cache_counts_once_and_keys_on_config_and_files(counted, tmp_path, monkeypatch, capsys):
    """data.count_cache: the first build counts and writes the tables, a later one with the same data loads them
    (counting would fail here) and reads the same rows; another scale or a rewritten Parquet file is another key;
    an unreadable cache file is counted again, with a warning."""
    import recdistill.data.counts as counts

    _, src = counted
    cache = tmp_path / "cache"
    sets = [*SETS, "data.counts=true", "data.count_scale=log", f"data.count_cache={cache}"]
    first = build_source(load_config(None, sets).data)
    (written,) = cache.glob("counts-*.npz")
    assert "counted, cached in" in first.describe()
    real_build = counts.build_tables

    def refuse(*a, **k):
        raise AssertionError("counted again although the cache holds these tables")

    monkeypatch.setattr(counts, "build_tables", refuse)
    again = build_source(load_config(None, [*sets, "data.batch_size=7", "data.workers=2"]).data)  # loader-only
    assert "loaded from" in again.describe()
    for day in (0, 3):
        assert torch.equal(again.read(day, 0, 400).dense, src.read(day, 0, 400).dense)
    assert again.tables.groups == src.tables.groups and again.tables.window is None
    monkeypatch.setattr(counts, "build_tables", real_build)
    std = build_source(load_config(None, [*sets, "data.count_scale=standard"]).data)  # another key: counted
    assert "counted" in std.describe() and len(list(cache.glob("counts-*.npz"))) == 2
    assert std.tables.shift and torch.equal(build_source(load_config(None, [*sets, "data.count_scale=standard"]).data)
                                            .read(2, 0, 300).dense, std.read(2, 0, 300).dense)

    written.write_bytes(b"not an npz")
    mended = build_source(load_config(None, sets).data)
    assert "unreadable" in capsys.readouterr().err and "counted" in mended.describe()
    assert torch.equal(mended.read(3, 0, 400).dense, src.read(3, 0, 400).dense)
    assert "loaded from" in build_source(load_config(None, sets).data).describe()  # the file was replaced

    # a source counted without the cache hands its tables to one (what the experiment does with its preflight's)
    from recdistill.data.counts import cache_path

    handed = load_config(None, [*SETS, "data.counts=true", "data.count_scale=log",
                                f"data.count_cache={tmp_path / 'h'}"])
    src.save_cache(cache_path(handed.data))
    (kept,) = (tmp_path / "h").glob("counts-*.npz")
    src.save_cache(cache_path(handed.data))  # there already: left as it is
    assert list((tmp_path / "h").iterdir()) == [kept]
    loaded = build_source(handed.data)
    assert "loaded from" in loaded.describe() and torch.equal(loaded.read(3, 0, 400).dense, src.read(3, 0, 400).dense)

    write_parquet(src.inner, str(tmp_path / "pq"), progress=False)
    pq_sets = [*sets, "data.source=parquet", f"data.path={tmp_path / 'pq'}"]
    build_source(load_config(None, pq_sets).data)
    assert "loaded from" in build_source(load_config(None, pq_sets).data).describe()
    victim = sorted((tmp_path / "pq").rglob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes())  # the same bytes, rewritten: a new modification time
    os.utime(victim, (victim.stat().st_atime, victim.stat().st_mtime + 10))
    assert "counted" in build_source(load_config(None, pq_sets).data).describe()

