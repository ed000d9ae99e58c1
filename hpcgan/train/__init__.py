"""Training: the loop, its state, the run folder, checkpoints and interruption handling."""

from hpcgan.train.checkpoint import CheckpointError, CheckpointManager
from hpcgan.train.loop import Trainer, train
from hpcgan.train.run_folder import RunFolder, RunLockedError
from hpcgan.train.signals import EXIT_INTERRUPTED

__all__ = ["EXIT_INTERRUPTED", "CheckpointError", "CheckpointManager", "RunFolder", "RunLockedError", "Trainer",
           "train"]
