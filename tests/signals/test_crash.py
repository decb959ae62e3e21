"""Crash safety: random interleavings of writes, window closes, crashes and restarts never lose or duplicate a
committed row (hypothesis), and a real writer process killed with SIGKILL between data and commit."""

import os
import signal
import subprocess
import sys
import time
import uuid

import fsspec
import torch
from helpers import META, ids_of, logits_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recdistill.signals.cli import verify
from recdistill.signals.reader import SignalReader
from recdistill.signals.schema import shard_path
from recdistill.signals.writer import _STOP, SignalWriter

W = 3  # steps per window
EXAMPLES = int(os.environ.get("SIGNALS_HYPOTHESIS_EXAMPLES", "25"))


class Crash(Exception):
    """Raised inside the writer thread to simulate dying between the shard and its commit marker."""


def crash(w: SignalWriter) -> None:
    """Abandon a writer the way a killed process would: whatever is not committed yet is simply gone."""
    w._error = Crash("killed")  # the serializer drops everything still queued
    w._queue.put(_STOP)
    w._thread.join()


def resume(uri: str) -> tuple[SignalWriter, int]:
    """Restart: a new writer, and the trainer resumes at the first window that is not committed (its checkpoint)."""
    w = SignalWriter(uri, 0, META)
    done = 0
    while w.is_committed(done):
        done += 1
    return w, done * W


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(["step", "step", "step", "crash", "crash_before_commit"]), min_size=1, max_size=40))
def test_interleavings_never_lose_or_duplicate_committed_rows(ops):
    uri = f"memory://prop-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    w, step = resume(uri)
    frozen: dict[str, bytes] = {}  # committed shard bytes: must never change
    for op in ops:
        if op == "step":
            win = step // W
            if w.window != win:
                if w.window is not None:
                    w.commit_window()
                w.begin_window(win)
            w.write(ids_of(step), logits_of(ids_of(step)), step)
            step += 1
        else:
            if op == "crash_before_commit" and w.window is not None:
                def die(window):
                    raise Crash(f"killed after writing the shard of window {window}")
                w._before_commit = die
                w.commit_window()
                try:
                    w.flush()
                except RuntimeError:
                    pass
            crash(w)
            for win in range(step // W + 1):
                path = shard_path(uri, win, 0)
                if w.is_committed(win) and fs.exists(f"{uri.split('://')[1]}/_commits/window={win}.rank=0.json"):
                    frozen.setdefault(path, fs.cat_file(path))
            w, step = resume(uri)
    w.close()  # clean shutdown commits the open window
    r = SignalReader(uri)
    expected = {int(i) for s in range(step) for i in ids_of(s)}
    assert r.stats.duplicates == 0, "a committed row was written twice"
    assert r.stats.rows == len(expected), (r.stats.rows, len(expected))
    _, found = r.lookup(torch.tensor(sorted(expected)))
    assert bool(found.all()), "a committed row was lost"
    for path, data in frozen.items():
        assert fs.cat_file(path) == data, f"{path} was rewritten after its commit"
    assert verify(uri) == []


CHILD = r"""
import sys, time, pathlib
sys.path.insert(0, sys.argv[3])
from helpers import META, ids_of, logits_of
from recdistill.signals.writer import SignalWriter
uri, marker = sys.argv[1], sys.argv[2]
w = SignalWriter(uri, 0, META)
def hang(window):
    pathlib.Path(marker).write_text(str(window))   # the shard is on disk, its commit marker is not
    time.sleep(600)
w._before_commit = lambda window: hang(window) if window == 2 else None
for win in range(3):
    w.begin_window(win)
    for s in range(win * 3, win * 3 + 3):
        w.write(ids_of(s), logits_of(ids_of(s)), s)
    w.commit_window()
w.flush()
"""


def test_sigkill_between_data_and_commit(tmp_path):
    uri, marker = str(tmp_path / "store"), tmp_path / "marker"
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, for helpers.py
    child = subprocess.Popen([sys.executable, "-c", CHILD, uri, str(marker), tests_dir])
    deadline = time.time() + 120
    while not marker.exists():
        assert child.poll() is None, f"writer process exited early with {child.returncode}"
        assert time.time() < deadline, "writer process never reached the commit of window 2"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    orphan = tmp_path / "store" / "window=2" / "rank=0.arrow"
    assert orphan.exists()  # data written, never committed
    assert any("orphan" in p for p in verify(uri))
    r = SignalReader(uri)
    assert r.windows == [0, 1]  # readers never see the uncommitted shard
    w, step = resume(uri)
    assert step == 6 and not orphan.exists()
    for s in range(step, 9):
        if w.window is None:
            w.begin_window(s // 3)
        w.write(ids_of(s), logits_of(ids_of(s)), s)
    w.close()
    r = SignalReader(uri)
    assert r.windows == [0, 1, 2] and r.stats.duplicates == 0 and r.stats.rows == 9 * 8
    assert verify(uri) == []
