"""The one interface between data readers and the training loop.

Every reader (memory, webdataset, dali) yields one rank's share of each global batch as float
(B, C, H, W) in [-1, 1] on the training device, with each image's class index beside it, and can
snapshot and restore its position so that a resumed run sees exactly the batches an uninterrupted one
would have. Every position holds the global part (epoch, batch): `batch` counts global batches served
in `epoch`, the same number on every rank.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, NamedTuple, Protocol

import torch

# What a scheduler sends to end or preempt a job (SLURM: TERM, or USR1/USR2 before a time limit); the
# training process turns each into a checkpoint and exit 75 (hpcgan/train/signals.py).
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class DataError(ValueError):
    """Unusable input data; the message names the file and what to do."""


class WorkerLost(DataError):
    """A reader's worker process died (killed, out of memory); the reader's position is unchanged, and the
    next `next_batch` starts new workers from it."""


def ignore_preemption_signals(worker_id: int = 0) -> None:
    """`worker_init_fn` of every reader's worker processes: they ignore the preemption signals.

    SLURM signals every process of a job step, data workers included; a worker that died of it would end
    the training process's step mid-way, before the checkpoint the main process is about to write. The
    main process decides when to stop, and its workers go with it.
    """
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def quiet_worker_deaths() -> None:
    """Leave the detection of a dead DataLoader worker to the reader's wait for its next batch.

    torch installs (once per process, with the first worker) a SIGCHLD handler that raises wherever the
    main thread happens to be, between a step's D and G updates included, where no consistent checkpoint
    can be written. Without it, the DataLoader notices a dead worker within seconds, inside `next()`,
    where the reader turns it into `WorkerLost` before anything changed.
    """
    handler = signal.getsignal(signal.SIGCHLD)
    if threading.current_thread() is threading.main_thread() and callable(handler) \
            and getattr(handler, "__module__", "").startswith("torch.utils.data"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


class Batch(NamedTuple):
    """One rank's share of a global batch: images and their classes travel together, so a conditional
    model sees each image with its own label whatever the reader's order."""

    images: torch.Tensor  # float (B, C, H, W) in [-1, 1] on the training device
    labels: torch.Tensor  # int64 (B,) indices into the reader's `classes`, on the images' device; 0 without


class Reader(Protocol):
    num_images: int  # images in one epoch of the training set
    batches_per_epoch: int  # global batches per epoch (the last partial batch is dropped)
    image_shape: tuple[int, int, int]  # (C, H, W)
    classes: tuple[str, ...]  # class names, index = label; () when the data has none (labels all 0)
    # True if the global order of samples is the same for every number of processes: the global part
    # of a position then continues it exactly on another world size.
    world_invariant: bool

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position in the data order."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def global_position(state: dict[str, Any]) -> dict[str, int]:
    """The part of a reader position that means the same on any number of processes."""
    return {"epoch": int(state["epoch"]), "batch": int(state["batch"])}


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The RNG that decides one epoch's order and flips; derived, never saved, so resume is exact."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def rank_slice(global_batch: int, rank: int, world: int) -> slice:
    if global_batch % world:
        raise DataError(f"train.batch_size={global_batch} is not divisible by the world size {world}: "
                        "pick a multiple of the number of processes")
    per_rank = global_batch // world
    return slice(rank * per_rank, (rank + 1) * per_rank)


def batches_per_epoch(num_images: int, global_batch: int, what: str) -> int:
    """Global batches in one epoch (the last partial one is dropped); at least one, or a clear error."""
    batches = num_images // global_batch
    if batches == 0:
        raise DataError(f"{what} has {num_images} images, fewer than one batch of train.batch_size={global_batch}: "
                        "lower the batch size or add data")
    return batches
