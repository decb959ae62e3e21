"""Streams of the streaming phase (DESIGN §4 'Streams'): the interface and schemas (base), the local and redis
backends, a local redis-server for tests and the demo (server), and the sample/teacher-signal joiner (joiner)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from recdistill.config import StreamConfig
from recdistill.streams.base import Stream


def open_stream(cfg: StreamConfig, name: str, *, url: str | None = None, consumer: str = "c0",
                producer_id: str = "p0") -> Stream:
    """The stream `name` of the configured backend. `url` overrides `cfg.redis_url` (a server started with
    `stream.start_server`); `consumer` names this process in the redis group, `producer_id` its appends."""
    if cfg.backend == "local":
        from recdistill.streams.local import LocalStream

        return LocalStream(cfg.path, name, cfg.partitions)
    from recdistill.streams.redis import RedisStream

    return RedisStream(url or cfg.redis_url, name, cfg.partitions, group=cfg.group, consumer=consumer,
                       producer_id=producer_id, entry_rows=cfg.entry_rows, maxlen=cfg.retention_maxlen,
                       retention_ms=int(cfg.retention_s * 1000) if cfg.retention_s else None,
                       dead_letter_after=cfg.dead_letter_after, claim_idle_ms=int(cfg.claim_idle_s * 1000),
                       reconnect_s=cfg.reconnect_s)


@contextmanager
def stream_server(cfg: StreamConfig) -> Iterator[str | None]:
    """The Redis URL streams of this config use: a private redis-server started for the duration of the block when
    `stream.start_server` is true (loopback, free port, AOF on), else `stream.redis_url`; None for the local
    backend."""
    if cfg.backend != "redis":
        yield None
    elif not cfg.start_server:
        yield cfg.redis_url
    else:
        from recdistill.streams.server import RedisServer

        with RedisServer() as server:
            yield server.url
