"""Parquet layout: round trips (hand-built and synthetic world, sampled views), and every bad-file error path."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import SCHEMA, make_batch

from recdistill.config import load_config
from recdistill.data.batch import Batch
from recdistill.data.loader import BatchLoader
from recdistill.data.parquet import DataError, ParquetSource, batch_to_table, layout_metadata, write_parquet
from recdistill.data.sampling import SamplingConfig
from recdistill.data.source import apply_view


def assert_same(a: Batch, b: Batch) -> None:
    for name in ("sample_id", "day", "traffic", "dense"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.labels.keys() == b.labels.keys() and all(torch.equal(a.labels[k], b.labels[k]) for k in a.labels)
    assert (a.p_true is None) == (b.p_true is None)
    for k in a.p_true or {}:
        assert torch.equal(a.p_true[k], b.p_true[k]), k
    assert a.sparse.keys() == b.sparse.keys()
    for k in a.sparse.keys():
        assert torch.equal(a.sparse[k].values(), b.sparse[k].values()) and \
            torch.equal(a.sparse[k].lengths(), b.sparse[k].lengths()), k
    assert torch.equal(a.history.offsets, b.history.offsets)
    assert a.history.fields.keys() == b.history.fields.keys()
    for k in a.history.fields:
        assert torch.equal(a.history.fields[k], b.history.fields[k]), k


def tiny_world(**over):
    from recdistill.data.world import SyntheticWorld  # imported here: the hand-built tests do not depend on it

    sets = [f"data.{k}={v}" for k, v in {"history_len": 64, "samples_per_day": 1500, "num_days": 3, **over}.items()]
    return SyntheticWorld(load_config(None, sets).data)


def write_table(path, table, meta=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata(meta) if meta else table, path)


def test_hand_built_round_trip_with_multi_id_sparse(tmp_path):
    b = make_batch(n=40)
    b.day = torch.full((40,), 3, dtype=torch.int32)
    # a multi-id sparse feature (list<int64>) next to single-id ones
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    lengths = torch.cat([torch.ones(80, dtype=torch.int64), torch.arange(40) % 3])
    values = torch.cat([b.sparse["user_id"].values(), b.sparse["item_id"].values(),
                        torch.arange(int((torch.arange(40) % 3).sum()))])
    b.sparse = KeyedJaggedTensor(keys=["user_id", "item_id", "tags"], values=values, lengths=lengths, stride=40)
    write_table(tmp_path / "d" / "x.parquet", batch_to_table(b, SCHEMA))
    src = ParquetSource(str(tmp_path / "d"))
    assert src.days() == [3] and src.num_rows(3) == 40 and src.sampling is None
    assert [t.kind for t in src.schema.tasks] == ["binary", "continuous"]  # inferred from values
    assert src.schema.sparse["tags"] == int(values[80:].max()) + 1
    assert_same(b, src.read(3, 0, 40))
    assert_same(b.select(torch.arange(7, 19)), src.read(3, 7, 19))


def test_world_round_trip_every_field(tmp_path):
    w = tiny_world()
    files = write_parquet(w, str(tmp_path / "out"), rows_per_file=600, row_group_rows=250, progress=False)
    # 250-row groups, a new part once a file holds >= 600 rows: 2 parts of 750 rows per day
    assert [f.split("/out/")[1] for f in files] == [f"day={d}/part-0000{p}.parquet" for d in range(3) for p in (0, 1)]
    assert [pq.ParquetFile(f).metadata.num_row_groups for f in files] == [3] * 6
    src = ParquetSource(str(tmp_path / "out"))
    assert src.days() == w.days() and src.schema == w.schema and src.sampling is None
    for day in w.days():
        assert src.num_rows(day) == 1500
        assert_same(w.read(day, 0, 1500), src.read(day, 0, 1500))
    assert_same(w.read(1, 240, 1300), src.read(1, 240, 1300))  # across row-group and file boundaries
    assert_same(w.read(2, 760, 761), src.read(2, 760, 761))
    with pytest.raises(ValueError, match="day 1 has no rows"):
        src.read(1, 1400, 1501)


def test_sampled_export_records_view_and_nests(tmp_path):
    w = tiny_world()
    teacher = SamplingConfig(name="teacher", r=0.5, q=1.0)
    student = SamplingConfig(name="student", r=0.2, q=0.9, q_eff=[0.9, 0.8, 0.7])
    write_parquet(w, str(tmp_path / "t"), view=teacher, row_group_rows=400, progress=False)
    src = ParquetSource(str(tmp_path / "t"))
    assert src.sampling == teacher
    for day in w.days():  # the sampled file holds exactly the view's rows, every field intact
        got = src.read(day, 0, src.num_rows(day))
        assert got.sampling == teacher
        assert_same(apply_view(w.read(day, 0, 1500), teacher, w.schema.num_traffic), got)
    direct = torch.cat([b.sample_id for b in BatchLoader(w, [0, 1], 100, view=student, prefetch=0)])
    via_file = torch.cat([b.sample_id for b in BatchLoader(src, [0, 1], 100, view=student, prefetch=0)])
    assert torch.equal(direct, via_file)  # the student's view of the teacher's file is the student's view
    with pytest.raises(ValueError, match="keeps more than the data's own sampling 'teacher'"):
        BatchLoader(src, [0], 10, view=SamplingConfig(name="wide", r=0.9))
    with pytest.raises(ValueError, match="keeps more than the data's own sampling 'teacher'"):
        write_parquet(src, str(tmp_path / "wide"), view=SamplingConfig(name="wide", r=0.9), progress=False)


def test_write_batches_across_days_and_mixed_day_row_groups(tmp_path):
    """Batches (not a source) as input; rows of several days interleaved inside one row group on reading."""
    a, b = make_batch(n=30, seed=1), make_batch(n=20, seed=2)
    a.day = (torch.arange(30) % 2).to(torch.int32)  # days 0,1,0,1,... inside one batch
    b.sample_id, b.day = b.sample_id + 100, torch.full((20,), 1, dtype=torch.int32)
    view = SamplingConfig(name="v", r=0.6)
    files = write_parquet([a, b], str(tmp_path / "w"), schema=SCHEMA, view=view, rows_per_file=5, progress=False)
    assert len(files) == 3 and all("/day=0/" in f or "/day=1/" in f for f in files)
    # a batch's rows are grouped by day before writing: one row group per (batch, day), not one per run of rows
    assert [pq.ParquetFile(f).metadata.num_row_groups for f in files] == [1, 1, 1]
    src = ParquetSource(str(tmp_path / "w"))
    assert src.sampling == view and src.schema.tasks == SCHEMA.tasks and src.schema.sparse == SCHEMA.sparse
    both = apply_view(Batch.concat([a, b]), view, SCHEMA.num_traffic)
    for day in (0, 1):
        assert_same(both.select(both.day == day), src.read(day, 0, src.num_rows(day)))
    # one hand-written file with interleaved days in one row group: each day keeps file order
    write_table(tmp_path / "m" / "x.parquet", batch_to_table(a, SCHEMA))
    mixed = ParquetSource(str(tmp_path / "m"))
    assert mixed.num_rows(0) == 15 and len(mixed.runs[0]) == 15  # 15 one-row runs, found by decoding 'day'
    assert_same(a.select(a.day == 1), mixed.read(1, 0, 15))
    assert_same(a.select(torch.tensor([4, 6, 8])), mixed.read(0, 2, 5))
    with pytest.raises(ValueError, match="needs schema="):
        write_parquet([a], str(tmp_path / "z"))


def test_history_len_truncation_keeps_recent(tmp_path):
    w = tiny_world()
    write_parquet(w, str(tmp_path / "o"), days=[0], progress=False)
    short = ParquetSource(str(tmp_path / "o"), history_len=10).read(0, 0, 200)
    full = w.read(0, 0, 200)
    assert torch.equal(short.history.fields["item"], full.history.last(10).fields["item"])


def good_table(n=5):
    return pa.table({"sample_id": pa.array(np.arange(n), pa.int64()), "day": pa.array([0] * n, pa.int32()),
                     "traffic": pa.array([0] * n, pa.int32()), "label_ctr": pa.array(np.arange(n) % 2, pa.float32()),
                     "sparse_user": pa.array(np.arange(n), pa.int64()),
                     "hist_item": pa.array([[1, 2]] * n, pa.list_(pa.int64())),
                     "hist_cat": pa.array([[3, 4]] * n, pa.list_(pa.int64()))})


@pytest.mark.parametrize("change,column", [
    (lambda t: t.drop_columns(["traffic"]), "missing required column 'traffic'"),
    (lambda t: t.drop_columns(["hist_item", "hist_cat"]), "missing required column 'hist_item'"),
    (lambda t: t.set_column(3, "label_ctr", pa.array(["a"] * 5)), "column 'label_ctr' has type string"),
    (lambda t: t.set_column(4, "sparse_user", pa.array([0.5] * 5)), "column 'sparse_user' has type double"),
    (lambda t: t.set_column(5, "hist_item", pa.array([1] * 5, pa.int64())), "column 'hist_item' has type int64"),
])
def test_bad_columns_name_file_and_column(tmp_path, change, column):
    path = tmp_path / "d" / "bad.parquet"
    write_table(path, change(good_table()))
    with pytest.raises(DataError) as e:
        ParquetSource(str(tmp_path / "d"))
    assert str(path) in str(e.value) and column in str(e.value)


def test_truncated_and_corrupt_files(tmp_path):
    path = tmp_path / "d" / "part.parquet"
    write_table(path, good_table())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"{path}: not a readable Parquet file"):
        ParquetSource(str(tmp_path / "d"))
    path.write_bytes(b"PAR1" + b"\x00" * 100)
    with pytest.raises(DataError, match=f"{path}: not a readable Parquet file"):
        ParquetSource(str(tmp_path / "d"))


def test_unequal_history_lists_and_nulls(tmp_path):
    t = good_table().set_column(6, "hist_cat", pa.array([[3, 4]] * 4 + [[3]], pa.list_(pa.int64())))
    write_table(tmp_path / "a" / "x.parquet", t)
    src = ParquetSource(str(tmp_path / "a"))
    assert len(src.read(0, 0, 4)) == 4  # the good rows read fine
    with pytest.raises(DataError, match=r"x.parquet: column 'hist_cat' has a different length than 'hist_item' "
                                        r"in the row with sample_id 4"):
        src.read(0, 0, 5)
    t = good_table().set_column(4, "sparse_user", pa.array([[1], [2, None], [], None, [5]], pa.list_(pa.int64())))
    write_table(tmp_path / "b" / "x.parquet", t)
    with pytest.raises(DataError, match=r"x.parquet: column 'sparse_user' has 1 null ids inside its lists"):
        ParquetSource(str(tmp_path / "b")).read(0, 0, 5)
    write_table(tmp_path / "c" / "x.parquet", good_table().set_column(0, "sample_id", pa.array([1, 2, None, 4, 5])))
    with pytest.raises(DataError, match=r"x.parquet: column 'sample_id' has 1 null values"):
        ParquetSource(str(tmp_path / "c"))
    labels = pa.array([1.0, None] * 2 + [0.0])
    write_table(tmp_path / "d" / "x.parquet", good_table().set_column(3, "label_ctr", labels))
    with pytest.raises(DataError, match=r"x.parquet: column 'label_ctr' has 2 null values"):
        ParquetSource(str(tmp_path / "d")).read(0, 0, 5)


def shifted(k):
    return good_table().set_column(0, "sample_id", pa.array(np.arange(5) + 5 * k, pa.int64()))


def test_duplicates_and_inconsistent_files(tmp_path):
    write_table(tmp_path / "b" / "1.parquet", good_table())
    write_table(tmp_path / "b" / "2.parquet", good_table())
    with pytest.raises(DataError, match=r"1.parquet, .*2.parquet: column 'sample_id' has duplicates"):
        ParquetSource(str(tmp_path / "b"))
    write_table(tmp_path / "c" / "1.parquet", shifted(0))
    write_table(tmp_path / "c" / "2.parquet", shifted(1).drop_columns(["hist_cat"]))
    with pytest.raises(DataError, match=r"2.parquet: columns differ from .*1.parquet: \['hist_cat'\]"):
        ParquetSource(str(tmp_path / "c"))
    write_table(tmp_path / "f" / "1.parquet", shifted(0))
    write_table(tmp_path / "f" / "2.parquet", shifted(1).set_column(5, "hist_item", pa.array([[1]] * 5,
                                                                                             pa.list_(pa.int32()))))
    with pytest.raises(DataError, match=r"2.parquet: columns differ from .*1.parquet: \['hist_item: list<.*int32"):
        ParquetSource(str(tmp_path / "f"))
    for key, a, b in [("sampling", SamplingConfig(name="a", r=0.5), SamplingConfig(name="b", r=0.4)),
                      ("tasks", None, None)]:
        meta_a, meta_b = layout_metadata(SCHEMA, a), layout_metadata(SCHEMA, b)
        if key == "tasks":
            meta_b[b"recdistill.tasks"] = json.dumps([{"name": "ctr", "kind": "continuous"}]).encode()
        sel = (b"recdistill." + key.encode(),)
        write_table(tmp_path / key / "1.parquet", shifted(0), {k: v for k, v in meta_a.items() if k in sel})
        write_table(tmp_path / key / "2.parquet", shifted(1), {k: v for k, v in meta_b.items() if k in sel})
        with pytest.raises(DataError, match=f"2.parquet: metadata 'recdistill.{key}' differs from .*1.parquet"):
            ParquetSource(str(tmp_path / key))
    write_table(tmp_path / "g" / "1.parquet", shifted(0), {b"recdistill.sampling": b'{"r": 7}'})
    with pytest.raises(DataError, match=r"1.parquet: metadata 'recdistill.sampling' is not a SamplingConfig"):
        ParquetSource(str(tmp_path / "g"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no \*.parquet files"):
        ParquetSource(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="absent: no such directory"):
        ParquetSource(str(tmp_path / "absent"))


def test_task_metadata_and_inference(tmp_path):
    meta = {b"recdistill.tasks": json.dumps([{"name": "cvr", "kind": "binary"}]).encode()}
    write_table(tmp_path / "d" / "x.parquet", good_table(), meta)
    with pytest.raises(DataError, match=r"metadata names tasks \['cvr'\] without a 'label_<task>' column"):
        ParquetSource(str(tmp_path / "d"))
    t = good_table().append_column("label_time", pa.array([0.0, 1.0, 2.5, 0.0, 1.0], pa.float32()))
    t = t.append_column("label_cvr", pa.array([0.0, 1.0, 0.0, 0.0, 0.0], pa.float32()))  # only where ctr is 1
    write_table(tmp_path / "e" / "x.parquet", t)
    src = ParquetSource(str(tmp_path / "e"))
    # time is non-zero on a row without a click (row 2): not within ctr; cvr is
    assert [(x.name, x.kind, x.within) for x in src.schema.tasks] == [
        ("ctr", "binary", None), ("time", "continuous", None), ("cvr", "binary", "ctr")]
    assert src.schema.sparse == {"user": 5} and src.schema.history == {"item": 3, "cat": 5}  # max id + 1
    assert src.schema.num_traffic == 1


def test_memory_filesystem_through_fsspec():
    w = tiny_world(num_days=2, samples_per_day=300)
    write_parquet(w, "memory://pq-test", progress=False)
    src = ParquetSource("memory://pq-test")
    assert_same(w.read(1, 0, 300), src.read(1, 0, 300))


def test_bad_metadata_json_and_task_kind(tmp_path):
    for name, meta, msg in [
        ("j", {b"recdistill.tasks": b"[{"}, r"metadata 'recdistill.tasks' is not a list of \{name, kind\}"),
        ("k", {b"recdistill.tasks": json.dumps([{"name": "ctr", "kind": "ordinal"}]).encode()},
         r"metadata 'recdistill.tasks' is not a list of \{name, kind\}: .*kind 'ordinal' is not 'binary' or "
         r"'continuous'"),
        ("s", {b"recdistill.schema": b"[1, 2]"}, r"metadata 'recdistill.schema' is not a JSON object"),
    ]:
        write_table(tmp_path / name / "x.parquet", good_table(), meta)
        with pytest.raises(DataError, match=f"{tmp_path / name / 'x.parquet'}: {msg}"):
            ParquetSource(str(tmp_path / name))


@pytest.mark.parametrize("change,meta,message", [
    (lambda t: t.set_column(4, "sparse_user", pa.array([0, 1, -3, 2, 4], pa.int64())), {},
     "column 'sparse_user' has id -3 outside [0, 5)"),
    (lambda t: t.set_column(6, "hist_cat", pa.array([[3, 1]] * 2 + [[3, 9]] + [[3, 1]] * 2, pa.list_(pa.int64()))),
     {"history": {"cat": 5}}, "column 'hist_cat' has id 9 outside [0, 5)"),
    (lambda t: t.set_column(2, "traffic", pa.array([0, 0, 2, 0, 0], pa.int32())), {"num_traffic": 2},
     "column 'traffic' has id 2 outside [0, 2)"),
    (lambda t: t.set_column(3, "label_ctr", pa.array([0, 1, 1, 0.5, 0], pa.float32())), None,
     "column 'label_ctr' of binary task 'ctr' has value 0.5"),
])
def test_ids_traffic_and_binary_labels_out_of_range(tmp_path, change, meta, message):
    """Values an embedding lookup, the debias q_eff[traffic] or BCE would misuse fail on read, naming file + column."""
    if meta is None:  # declared binary: inference alone would call 0.5 continuous
        meta = {b"recdistill.tasks": json.dumps([{"name": "ctr", "kind": "binary"}]).encode()}
    else:
        meta = {b"recdistill.schema": json.dumps(meta).encode()} if meta else None
    path = tmp_path / "d" / "x.parquet"
    write_table(path, change(good_table()), meta)
    src = ParquetSource(str(tmp_path / "d"))
    assert len(src.read(0, 0, 2)) == 2  # the rows before the bad one read fine
    with pytest.raises(DataError) as e:
        src.read(0, 0, 5)
    assert str(e.value).startswith(f"{path}: {message}")


def test_reexport_keeps_list_sparse_columns(tmp_path):
    """A list<int64> sparse column stays a list when a Parquet directory is re-exported (e.g. as a sampled view),
    even when the first rows written happen to have one id each; Batches that turn multi-id later are refused."""
    t = good_table(8).append_column("sparse_tags", pa.array([[1], [2], [3], [4], [1, 2], [], [3], [4]],
                                                             pa.list_(pa.int64())))
    write_table(tmp_path / "a" / "x.parquet", t)
    src = ParquetSource(str(tmp_path / "a"))
    assert src.list_sparse == ("tags",)
    write_parquet(src, str(tmp_path / "b"), row_group_rows=3, progress=False)  # first group: [1], [2], [3]
    out = ParquetSource(str(tmp_path / "b"))
    assert pa.types.is_list(pq.read_schema(out.files[0]).field("sparse_tags").type)
    assert_same(src.read(0, 0, 8), out.read(0, 0, 8))
    one, many = src.read(0, 0, 3), src.read(0, 3, 8)
    with pytest.raises(ValueError, match=r"sparse feature 'tags' had one id per row in the first rows written"):
        write_parquet([one, many], str(tmp_path / "c"), schema=src.schema, progress=False)
    write_parquet([one, many], str(tmp_path / "d"), schema=src.schema, list_sparse=["tags"], progress=False)
    assert_same(src.read(0, 0, 8), ParquetSource(str(tmp_path / "d")).read(0, 0, 8))
