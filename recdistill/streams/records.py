"""Stream records from training data: the sample records a publisher appends and the signal records a teacher
appends (schemas in streams/base.py).

Event time is the sample's place on the day's timeline: day d starts at `DAY0_MS + d * DAY_MS`, and row i of the
day's `n` rows happens at `i * DAY_MS / n` into it (the synthetic world's index within the day is its order of
arrival). `seq` is the producer's count of rows it appended before, so a restarted producer knows where it was.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from recdistill.data.batch import Batch
from recdistill.streams.base import sample_schema, signal_schema, version_column

DAY_MS = 86_400_000
DAY0_MS = 1_700_000_000_000  # an arbitrary epoch of the simulated timeline: day 0 starts here


def event_time_ms(sample_id: np.ndarray, rows_per_day: int) -> np.ndarray:
    """Event time of synthetic-world samples (sample_id = day << 40 | index) on a timeline of `rows_per_day`."""
    day, idx = sample_id >> np.int64(40), sample_id & np.int64((1 << 40) - 1)
    return DAY0_MS + day * DAY_MS + idx * DAY_MS // max(rows_per_day, 1)


def day_end_ms(day: int) -> int:
    """Event time at which `day` is over (the watermark that flushes the joiner at the end of the day)."""
    return DAY0_MS + (day + 1) * DAY_MS


def sample_records(batch: Batch, tasks: list[str], rows_per_day: int, seq0: int) -> pa.Table:
    """Sample-stream rows of a batch: keys, day, traffic, one label per task."""
    ids = batch.sample_id.numpy().astype(np.int64)
    n = len(ids)
    cols = {"sample_id": ids, "event_time_ms": event_time_ms(ids, rows_per_day),
            "seq": np.arange(seq0, seq0 + n, dtype=np.int64), "day": batch.day.numpy().astype(np.int32),
            "traffic": batch.traffic.numpy().astype(np.int32),
            **{f"label_{t}": batch.labels[t].numpy().astype(np.float32) for t in tasks}}
    return pa.Table.from_pydict(cols, schema=sample_schema(tasks))


def signal_records(sample_id: torch.Tensor | np.ndarray, logits: torch.Tensor | np.ndarray, *, step: int,
                   version: str, rows_per_day: int, seq0: int) -> pa.Table:
    """Teacher-signal rows: the samples' keys (event time = the sample's), raw logits [n, T], step, version."""
    ids = np.asarray(sample_id, dtype=np.int64)
    z = np.asarray(logits, dtype=np.float32)
    n, num = z.shape
    flat = pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1)), num)
    return pa.Table.from_arrays(
        [pa.array(ids), pa.array(event_time_ms(ids, rows_per_day)), pa.array(np.arange(seq0, seq0 + n, dtype=np.int64)),
         flat, pa.array(np.full(n, step, np.int64)), version_column(version, n)], schema=signal_schema(num))
