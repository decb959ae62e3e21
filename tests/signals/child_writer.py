"""A teacher rank in its own process, for the SIGKILL tests (run as a script, killed by the test).

    python child_writer.py URI READY_FILE MODE
      MODE hang:  write windows 0..2 (3 steps each, 8 rows a step); after window 2's shard is written, touch
                  READY_FILE and hang before its commit marker (the test kills it there)
      MODE steps: touch READY_FILE, then write STEPS steps of ROWS rows, window_steps=WINDOW, a short sleep per
                  step (the test kills it at a random moment)
"""

import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/, for helpers.py
from helpers import META, ids_of, logits_of  # noqa: E402

from recdistill.signals.schema import Commit  # noqa: E402
from recdistill.signals.writer import SignalWriter  # noqa: E402

STEPS, ROWS, WINDOW = 40, 2000, 2


def step_ids(step: int) -> torch.Tensor:
    """The ROWS sample ids of one step in MODE steps (disjoint across steps)."""
    return torch.arange(ROWS) + step * 1_000_000


def hang(uri: str, ready: pathlib.Path) -> None:
    w = SignalWriter(uri, 0, META)
    marker = w._write_marker

    def hang_before_marker(commit: Commit) -> None:  # wraps the real marker write of this writer
        if commit.window == 2:
            ready.write_text(str(commit.window))  # the shard is on disk, its commit marker is not
            time.sleep(600)
        marker(commit)

    w._write_marker = hang_before_marker
    for win in range(3):
        w.begin_window(win)
        for s in range(win * 3, win * 3 + 3):
            w.write(ids_of(s), logits_of(ids_of(s)), s)
        w.commit_window()
    w.flush()


def steps(uri: str, ready: pathlib.Path) -> None:
    w = SignalWriter(uri, 0, META, window_steps=WINDOW, handoff_rows=ROWS)
    ready.write_text("ready")
    for s in range(STEPS):
        w.write(step_ids(s), logits_of(step_ids(s)), s)
        time.sleep(0.002)  # a "training step"
    w.close()


if __name__ == "__main__":
    uri, ready, mode = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    {"hang": hang, "steps": steps}[mode](uri, ready)
