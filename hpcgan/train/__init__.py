"""Training: the loop, its state, checkpoints and interruption handling."""

from hpcgan.train.checkpoint import CheckpointError, CheckpointManager
from hpcgan.train.loop import Trainer, train
from hpcgan.train.signals import EXIT_INTERRUPTED

__all__ = ["EXIT_INTERRUPTED", "CheckpointError", "CheckpointManager", "Trainer", "train"]
