"""The two edges of a multi-process run: leaving the process group, and resuming on another process count.

Leaving. A gloo group runs worker threads that drop each finished collective, and with it the last
reference to any tensor Python has already let go of. Freeing such a tensor takes the GIL; a thread that
asks for it once the interpreter has begun to finalize is ended by CPython mid-destructor, and the
process aborts with "terminate called without an active exception". `release_distributed` therefore
meets the other ranks at a barrier (no rank closes its connections while a peer still reads from them),
destroys the group and drops it while Python is fully alive: its destructor drains the work queue and
joins the threads.

Resuming on another number of processes. A checkpoint holds one file of RNG and reader state per rank
that wrote it, which does not fit a different set of ranks. What carries over is global: the batch size
(`train.batch_size` is global), the data position as (epoch, global batch index), the augmentation's p
and its ADA tally; each rank's RNG streams are derived afresh from (seed, rank, step).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState

from hpcgan.data.reader import Reader, global_position
from hpcgan.train.checkpoint import load_torch, rank_file_name
from hpcgan.train.run_folder import CONFIG_FILE, config_of
from hpcgan.train.state import TrainState, seed_everything

if dist.is_available():
    # torch.distributed.nn binds `group.WORLD` as a default argument when it is first imported; torch
    # imports it lazily (through torch._dynamo) once the group exists, and would then hold the group, and
    # its threads, until the interpreter's own teardown. Imported first, it binds None.
    import torch.distributed.nn  # noqa: F401

log = logging.getLogger(__name__)


def agree(ok: bool, world: int, device: torch.device) -> bool:
    """True on every rank only if `ok` is True on every rank; also a barrier."""
    if world == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def share(value: int, world: int, device: torch.device) -> int:
    """Rank 0's `value` on every rank (a broadcast)."""
    if world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def release_distributed() -> None:
    """Leave the default process group; a no-op without one.

    On a normal return every rank first waits at a barrier for the others. A rank leaving on an exception
    does not wait: its peers may be inside a collective it will never join, and fail on its closed
    connections instead. The group's threads are joined here once nothing else holds the group (a
    finished Trainer's DDP wrappers are collected here too); Accelerate's record of the group is cleared,
    so a later Accelerator starts a new one.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    group = dist.group.WORLD
    if sys.exc_info()[0] is None:
        try:
            dist.barrier()
        except RuntimeError as err:
            log.warning("final barrier failed (%s): a peer left early; leaving without it", err)
    dist.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    gc.collect()
    del group  # dropped with the GIL released; as the last reference, its destructor joins the threads


def resume_seed(seed: int, rank: int, step: int, stream: str) -> int:
    """A rank's seed for `stream` after a change of process count: a hash of (seed, rank, step), so no two
    ranks, and no two resumes, share a stream."""
    digest = hashlib.blake2b(f"hpcgan.resume.{stream}:{seed}:{rank}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def resume_on_new_world(folder: Path, state: TrainState, *, seed: int, rank: int, world: int, global_batch: int,
                        reader: Reader, augment: Any | None) -> str:
    """Continue `folder`, written by `state.world_size` processes, on `world`; returns what changed, in a line.

    The shared parts (weights, optimizers, EMA, `state`) are loaded already; a per-rank file this rank may
    have found is overridden: the reader goes to the global position rank 0 saved, every RNG stream is
    re-derived from (seed, rank, step), and the augmentation takes rank 0's p with the ADA tally of all
    old ranks, on rank 0 only (the next adjustment sums it over the ranks, as it would have).
    """
    before = state.world_size
    position = global_position(state.data)
    reader.load_state_dict(position)
    seed_everything(resume_seed(seed, rank, state.step, "global"))
    parts = [f"resuming with {_processes(world)} a checkpoint written by {before}: "
             f"{_batch_change(folder, global_batch, world)}",
             f"data position epoch {position['epoch']} batch {position['batch']} kept"]
    if not reader.world_invariant:
        parts[-1] += (f" (this reader splits an epoch by process count: the rest of epoch {position['epoch']} "
                      f"may repeat or skip samples; exact again from epoch {position['epoch'] + 1})")
    parts.append("RNG streams re-derived from (seed, rank, step)")
    if augment is not None:
        augment.load_state_dict(_merged_augment(folder, augment, before, rank,
                                                resume_seed(seed, rank, state.step, "augment")))
        parts.append(f"augmentation p={augment.p:.4g} kept")
    return ", ".join(parts)


def _processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


def _batch_change(folder: Path, global_batch: int, world: int) -> str:
    """The global batch, and whether it is the checkpoint's (its config.yaml, when there is one)."""
    saved = config_of(folder).train.batch_size if (folder / CONFIG_FILE).is_file() else None
    if saved in (None, global_batch):
        return f"global batch {global_batch} kept ({global_batch // world} per process)"
    return (f"global batch {saved} -> {global_batch} by the config ({global_batch // world} per process; "
            "the data position counts batches of the new size)")


def _merged_augment(folder: Path, augment: Any, before: int, rank: int, seed: int) -> dict[str, Any]:
    """The augmentation state for `rank` of a new world: p from old rank 0, the ADA tally of every old rank
    summed onto rank 0 (zero elsewhere), and a fresh RNG seeded with `seed`."""
    saved = [load_torch(folder / rank_file_name(old))["augment"] for old in range(before if rank == 0 else 1)]
    merged = augment.state_dict()
    merged["p"] = saved[0]["p"]
    merged["signs"] = sum(s["signs"] for s in saved) if rank == 0 else torch.zeros_like(saved[0]["signs"])
    merged["rng"] = torch.Generator(augment.device).manual_seed(seed).get_state()
    return merged
