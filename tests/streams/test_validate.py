"""RecordCheck, the consumer-side check of stream rows: each rule flags exactly the rows it should, with the first
reason that applies, and NaN teacher logits are not the stream's fault (they pass: the student rejects them)."""

import numpy as np
import pyarrow as pa

from recdistill.streams.validate import RecordCheck


def joined(n=8):
    ids = np.arange(n, dtype=np.int64)
    logits = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(3 * n, dtype=np.float32)), 3)
    return {"sample_id": ids, "event_time_ms": ids * 10, "seq": ids, "traffic": np.zeros(n, np.int32),
            "label_ctr": np.zeros(n, np.float32), "logits": logits, "has_signal": np.ones(n, bool)}


CHECK = RecordCheck(labels=["label_ctr"], traffic_sources=2, has_signal=True, logits=3,
                    known_ids=lambda ids: ids < 7)


def test_each_rule_flags_its_rows():
    cols = joined()
    cols["label_ctr"] = pa.array([0, np.nan, 1, None, 0, 0, 0, 0], pa.float32())
    cols["traffic"] = pa.array([0, 0, 5, 0, -1, 1, 0, 0], pa.int32())
    lg = [[0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1, 2], [float("nan")] * 3, None, [1, 2]]
    cols["logits"] = pa.array(lg, pa.list_(pa.float32()))
    cols["has_signal"] = pa.array([True] * 6 + [True, False])
    reasons = CHECK(pa.table(cols)).tolist()
    assert reasons[0] == "" and reasons[5] == ""  # NaN logits pass: the student's gate rejects and counts them
    assert "label_ctr" in reasons[1] and "label_ctr" in reasons[3]
    assert "traffic" in reasons[2] and "traffic" in reasons[4]
    assert "logits" in reasons[6]  # a signal without logits
    assert "logits" in reasons[7]  # no signal, but logits of another length
    cols = joined()
    cols["has_signal"] = pa.array([False] * 7 + [None])
    cols["logits"] = pa.nulls(8, pa.list_(pa.float32(), 3))
    reasons = CHECK(pa.table(cols)).tolist()
    assert reasons[:7] == [""] * 7 and "has_signal" in reasons[7]  # label-only rows need no logits


def test_missing_columns_wrong_types_and_unknown_ids():
    cols = joined()
    del cols["seq"]
    assert set(CHECK(pa.table(cols)).tolist()) == {"no column 'seq'"}
    cols = joined()
    cols["label_ctr"] = pa.array(["0"] * 8)
    assert all("not a number" in r for r in CHECK(pa.table(cols)))
    cols = joined()
    cols["logits"] = pa.array(["x"] * 8)
    assert all("expected a list of 3 floats" in r for r in CHECK(pa.table(cols)))
    reasons = CHECK(pa.table(joined())).tolist()
    assert reasons[:7] == [""] * 7 and reasons[7] == "sample_id outside the data source"
