"""Fixtures of the stream tests: a real redis-server (loopback, free port, AOF on) and a stream factory per backend.

One server serves a whole test module (starting one costs ~50 ms, but a fresh one per test adds up); tests keep
apart by stream name. Tests that kill the server start their own.
"""

import uuid

import numpy as np
import pyarrow as pa
import pytest

from recdistill.streams.local import LocalStream
from recdistill.streams.redis import RedisStream
from recdistill.streams.server import RedisServer


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as server:
        yield server


def make_samples(lo: int, hi: int, t0: int = 1_000, step_ms: int = 10) -> pa.Table:
    """Samples with ids lo..hi-1, event times t0 + id*step_ms, seq = id, a label and a day."""
    ids = np.arange(lo, hi, dtype=np.int64)
    return pa.table({"sample_id": ids, "event_time_ms": t0 + ids * step_ms, "seq": ids,
                     "day": pa.array(np.zeros(len(ids), np.int32)),
                     "label_ctr": pa.array((ids % 3 == 0).astype(np.float32))})


@pytest.fixture
def sample_rows():
    """make_samples(lo, hi, t0=1000, step_ms=10): a table of sample-stream rows."""
    return make_samples


@pytest.fixture(params=["local", "redis"])
def make_stream(request, tmp_path):
    """make_stream(name=None, partitions=1, **backend kwargs) -> a fresh stream of the parametrised backend."""
    suffix = uuid.uuid4().hex[:8]
    opened = []

    def make(name: str | None = None, partitions: int = 1, **kw):
        name = name or f"s-{suffix}"
        if request.param == "local":
            kw.pop("consumer", None)
            s = LocalStream(str(tmp_path / "streams"), name, partitions, poll_interval=0.01)
        else:
            server = request.getfixturevalue("redis_server")
            s = RedisStream(server.url, name, partitions, entry_rows=kw.pop("entry_rows", 64), **kw)
        opened.append(s)
        return s

    make.backend = request.param
    yield make
    for s in opened:
        s.close()
