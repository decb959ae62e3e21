"""A streaming student that SIGKILLs itself at one step: fault injection from the test side.

    python tests/train/stream_student_kill_at.py STEP KEY=VALUE ...

Runs StreamingStudent over the configured joined stream (config = defaults + the overrides), with
StudentTrainer.train_step wrapped so that the process kills itself when it is about to take step STEP (after the
checkpoints before it were written, before that step's update). Used by tests/train/test_stream_student.py.
"""

import os
import signal
import sys

from recdistill.config import load_config
from recdistill.streams import open_stream
from recdistill.train.stream_student import StreamingStudent
from recdistill.train.student import StudentTrainer

if __name__ == "__main__":
    step, overrides = int(sys.argv[1]), sys.argv[2:]
    real = StudentTrainer.train_step

    def train_step(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - the real method's
        if self.steps == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *args, **kwargs)

    StudentTrainer.train_step = train_step
    cfg = load_config(None, overrides)
    student = StreamingStudent(StudentTrainer(cfg, run_dir=cfg.student.checkpoint_dir, open_store=False),
                               open_stream(cfg.stream, "joined"))
    student.run()
    student.finish()
    sys.exit(0)
