"""`python tests/kill_after_first_epoch.py ARGS` runs the stage `python -m carso ARGS` and SIGKILLs the process
right after it checkpointed its first epoch: a deterministic kill point (no polling race with a fast machine).
Under torchrun each process that saves the checkpoint dies there, and torchrun stops the others."""
import os
import signal
import sys

import carso.resume as resume

_save = resume.EpochCheckpoint.save


def _save_then_die(self, parts, curve):
    _save(self, parts, curve)
    if len(curve) == 1:
        os.kill(os.getpid(), signal.SIGKILL)


resume.EpochCheckpoint.save = _save_then_die

if __name__ == "__main__":
    from carso.cli import main

    sys.exit(main(sys.argv[1:]))
