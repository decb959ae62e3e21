"""Crash safety: random interleavings of writes, window closes, flushes, crashes and restarts over two ranks never
lose or duplicate a committed row (hypothesis, in-process), and real writer processes killed with SIGKILL, both
exactly between a shard and its commit marker and at random moments (hypothesis), restart without loss.

SIGNALS_HYPOTHESIS_EXAMPLES (default 25) and SIGNALS_KILL_EXAMPLES (default 4) raise the example counts.
"""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from helpers import META, ids_of, logits_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recdistill.signals.check import verify
from recdistill.signals.reader import SignalReader
from recdistill.signals.schema import commit_path, shard_path
from recdistill.signals.writer import _STOP, SignalWriter

W = 3  # steps per window
EXAMPLES = int(os.environ.get("SIGNALS_HYPOTHESIS_EXAMPLES", "25"))
KILL_EXAMPLES = int(os.environ.get("SIGNALS_KILL_EXAMPLES", "4"))
CHILD = Path(__file__).with_name("child_writer.py")
_spec = importlib.util.spec_from_file_location("child_writer", CHILD)
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)


class Crash(Exception):
    """Raised inside the writer thread to simulate dying between the shard and its commit marker."""


def crash(w: SignalWriter) -> None:
    """Abandon a writer the way a killed process would: whatever its thread has not committed yet is gone."""
    w._error = Crash("killed")  # the serializer drops everything still queued
    w._queue.put(_STOP)
    w._thread.join()


def resume(uri: str, rank: int) -> tuple[SignalWriter, int]:
    """Restart: a new writer; the trainer resumes at the first window not committed (it checkpoints at commits)."""
    w = SignalWriter(uri, rank, META)
    done = 0
    while w.is_committed(done):
        done += 1
    return w, done * W


OPS = st.tuples(st.sampled_from(["step"] * 4 + ["flush", "crash", "crash_before_commit", "close_restart"]),
                st.integers(0, 1))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, min_size=1, max_size=60))
def test_interleavings_never_lose_or_duplicate_committed_rows(ops):
    uri = f"memory://prop-{uuid.uuid4().hex}"
    fs, root = fsspec.core.url_to_fs(uri)
    state = {r: [*resume(uri, r), {}] for r in (0, 1)}  # rank -> [writer, next step, {window: ids this session}]
    expected: set[int] = set()  # ids of every row whose window a commit marker vouches for
    frozen: dict[str, bytes] = {}  # committed shard bytes: must never change

    def settle(rank):
        """After a writer's end: its session's windows that reached the store count, the others are lost."""
        for win, ids in state[rank][2].items():
            if fs.exists(commit_path(root, win, rank)):
                expected.update(ids)
                path = shard_path(root, win, rank)
                assert frozen.setdefault(path, fs.cat_file(path)) == fs.cat_file(path), f"{path} rewritten"

    for op, rank in ops:
        w, step, session = state[rank]
        if op == "step":
            win = step // W
            if w.window != win:
                if w.window is not None:
                    w.commit_window()
                w.begin_window(win)
            ids = ids_of(step, rank)
            w.write(ids, logits_of(ids), step)
            session.setdefault(win, []).extend(ids.tolist())
            state[rank][1] = step + 1
            continue
        if op == "flush":
            w.flush()
            continue
        if op == "close_restart":  # graceful shutdown mid-window: the open window is committed as it is
            w.close()
        else:
            if op == "crash_before_commit" and w.window is not None:
                def die(commit):  # in place of the marker write: the shard is on the store, its marker never
                    raise Crash(f"killed after writing the shard of window {commit.window}")
                w._write_marker = die
                w.commit_window()
                try:
                    w.flush()
                except RuntimeError:
                    pass
            crash(w)
        settle(rank)
        state[rank] = [*resume(uri, rank), {}]
    for rank in (0, 1):
        state[rank][0].close()  # clean shutdown commits the open window
        settle(rank)
    r = SignalReader(uri, tasks=META.tasks)
    assert r.stats.duplicates == 0, "a committed row was written twice"
    assert r.stats.rows == len(expected), (r.stats.rows, len(expected))
    q = torch.tensor(sorted(expected), dtype=torch.int64)
    logits, found = r.lookup(q)
    assert bool(found.all()), "a committed row was lost"
    torch.testing.assert_close(logits, logits_of(q))
    assert verify(uri, allow_empty=True) == []  # a run of flushes alone commits nothing


def run_child(uri: str, ready: Path, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(CHILD), uri, str(ready), mode])
    deadline = time.time() + 120
    while not ready.exists():
        assert proc.poll() is None, f"writer process exited early with {proc.returncode}"
        assert time.time() < deadline, "writer process never got ready"
        time.sleep(0.02)
    return proc


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() in (-signal.SIGKILL, 0)  # 0: it finished before the kill landed


@pytest.mark.multiproc
def test_sigkill_between_data_and_commit(tmp_path):
    uri, ready = str(tmp_path / "store"), tmp_path / "ready"
    proc = run_child(uri, ready, "hang")
    kill(proc)
    assert proc.returncode == -signal.SIGKILL
    orphan = tmp_path / "store" / "window=2" / "rank=0.arrow"
    assert orphan.exists()  # data written, never committed
    assert any("orphan" in p for p in verify(uri))
    r = SignalReader(uri)
    assert r.windows == [0, 1]  # readers never see the uncommitted shard
    w, step = resume(uri, 0)
    assert step == 6 and not orphan.exists() and w.stats.orphans_removed == 1
    for s in range(step, 9):
        if w.window is None:
            w.begin_window(s // 3)
        w.write(ids_of(s), logits_of(ids_of(s)), s)
    w.close()
    r = SignalReader(uri)
    assert r.windows == [0, 1, 2] and r.stats.duplicates == 0 and r.stats.rows == 9 * 8
    assert verify(uri) == []


@pytest.mark.multiproc
@settings(max_examples=KILL_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.floats(0.0, 0.15))
def test_sigkill_at_a_random_moment_then_restart_loses_and_duplicates_nothing(delay):
    d = Path(tempfile.mkdtemp(prefix="sigkill-"))
    try:
        uri, ready = str(d / "store"), d / "ready"
        proc = run_child(uri, ready, "steps")
        time.sleep(delay)
        kill(proc)
        problems = verify(uri, allow_empty=True)  # a kill leaves at most orphans and temp files, nothing a reader sees
        assert all("orphan" in p or "temp file" in p for p in problems), problems
        before = SignalReader(uri)
        frozen = {p: p.read_bytes() for p in (d / "store").glob("window=*/rank=0.arrow")
                  if int(p.parent.name.split("=")[1]) in before.windows}
        w = SignalWriter(uri, 0, META, window_steps=child.WINDOW)
        start = 0
        while w.is_committed(start // child.WINDOW):
            start += child.WINDOW
        assert start == len(before.windows) * child.WINDOW  # commits are in window order: no gaps
        for s in range(start, child.STEPS):
            w.write(child.step_ids(s), logits_of(child.step_ids(s)), s)
        w.close()
        r = SignalReader(uri)
        assert r.stats.duplicates == 0 and r.stats.rows == child.STEPS * child.ROWS
        q = torch.cat([child.step_ids(s) for s in range(child.STEPS)])
        logits, found = r.lookup(q)
        assert bool(found.all())
        torch.testing.assert_close(logits, logits_of(q))
        assert all(p.read_bytes() == b for p, b in frozen.items()), "a committed shard was rewritten"
        assert verify(uri) == []
    finally:
        shutil.rmtree(d, ignore_errors=True)
