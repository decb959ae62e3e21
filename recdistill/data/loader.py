"""Batches from any data source: sampled view, sharded by rank, prepared on a background thread.

    from recdistill.data.loader import BatchLoader
    from recdistill.data.source import build_source
    src = build_source(cfg.data)
    for batch in BatchLoader(src, src.days()[:-1], 512, view=cfg.sampling.teacher, rank=r, world_size=w):
        ...

Sharding is by raw chunk: chunk c of a day (rows [c*chunk_rows, (c+1)*chunk_rows)) belongs to rank c % world_size,
so ranks never generate or read each other's rows. After sampling, ranks can end a day with a different number of
batches (at most one apart when chunk_rows is a multiple of batch_size); distributed trainers bound their steps.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch

from recdistill.config import SamplingConfig
from recdistill.data.batch import Batch
from recdistill.data.source import DataSource, apply_view, check_nested


class BatchLoader:
    """Iterates fixed-size Batches of `days` from `source` for one rank, in a deterministic order."""

    def __init__(self, source: DataSource, days: list[int], batch_size: int, *, view: SamplingConfig | None = None,
                 rank: int = 0, world_size: int = 1, chunk_rows: int | None = None, prefetch: int = 4,
                 drop_last: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        missing = sorted(set(days) - set(source.days()))
        if missing:
            raise ValueError(f"days {missing} not in the data source (it has {source.days()})")
        if view is not None:
            binary = [t.name for t in source.schema.tasks if t.kind == "binary"]
            if view.task not in binary:
                raise ValueError(f"sampling view '{view.name}' decides positives by task '{view.task}', which is not a "
                                 f"binary task of this data (binary tasks: {binary}); set sampling.<view>.task")
            check_nested(view, source.sampling, source.schema.num_traffic)
        self.source, self.days, self.batch_size = source, list(days), batch_size
        self.view, self.rank, self.world_size = view, rank, world_size
        self.chunk_rows = chunk_rows or batch_size * 4
        self.prefetch, self.drop_last = prefetch, drop_last

    def _chunks(self, day: int) -> Iterator[tuple[int, int]]:
        n = self.source.num_rows(day)
        for c, start in enumerate(range(0, n, self.chunk_rows)):
            if c % self.world_size == self.rank:
                yield start, min(start + self.chunk_rows, n)

    def _produce(self) -> Iterator[Batch]:
        nt = self.source.schema.num_traffic
        for day in self.days:
            buf: list[Batch] = []
            held = 0
            for start, stop in self._chunks(day):
                part = apply_view(self.source.read(day, start, stop), self.view, nt)
                buf.append(part)
                held += len(part)
                while held >= self.batch_size:
                    merged = Batch.concat(buf)
                    yield merged.select(torch.arange(self.batch_size))
                    rest = merged.select(torch.arange(self.batch_size, held))
                    buf, held = [rest], held - self.batch_size
            if held and not self.drop_last:
                yield Batch.concat(buf)

    def __iter__(self) -> Iterator[Batch]:
        if self.prefetch <= 0:
            yield from self._produce()
            return
        yield from _background(self._produce(), self.prefetch)


_END = object()


def _background(gen: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """Run `gen` on a daemon thread, `depth` items ahead; its exceptions re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in gen:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            q.put(exc)

    t = threading.Thread(target=work, name="recdistill-loader", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
