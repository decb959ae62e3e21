"""The real teacher entry with one rank SIGKILLing itself at one step: fault injection from the test side.

    torchrun --nproc_per_node=2 tests/train/teacher_kill_at.py RANK:STEP [recdistill.train.teacher arguments]

Wraps TeacherTrainer.valid_loss, which train_step calls after the step's forward and after its valid rows were
queued to the signal writer, and before backward: at that rank and step the process kills itself there (so the
open window's rows, queued but uncommitted, die with it; a filler step kills the same way). Every other call runs
the real method. Used by tests/train/test_teacher_checkpoint.py.
"""

import os
import signal
import sys

from recdistill.train import teacher


def kill_at(rank: int, step: int) -> None:
    """Patch TeacherTrainer so that `rank` SIGKILLs its own process at `step`, between signals and backward."""
    real = teacher.TeacherTrainer.valid_loss

    def valid_loss(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - the real method's
        if (self.info.rank, self.steps) == (rank, step):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *args, **kwargs)

    teacher.TeacherTrainer.valid_loss = valid_loss


if __name__ == "__main__":
    spec, argv = sys.argv[1], sys.argv[2:]
    kill_at(*(int(x) for x in spec.split(":")))
    sys.exit(teacher.main(argv))
