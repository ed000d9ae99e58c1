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
and its ADA tally; each rank's RNG streams are derived afresh from (seed, rank, step). Every per-rank part
is registered with the rule that does this for it (the reshard rules below).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState

from hpcgan.data.reader import Reader, global_position
from hpcgan.train.checkpoint import Reshard, load_torch, rank_file_name
from hpcgan.train.run_folder import CONFIG_FILE, config_of
from hpcgan.train.state import TrainState, seed_everything

if dist.is_available():
    # torch.distributed.nn binds `group.WORLD` as a default argument when it is first imported; torch
    # imports it lazily (through torch._dynamo) once the group exists, and would then hold the group, and
    # its threads, until the interpreter's own teardown. Imported first, it binds None.
    import torch.distributed.nn  # noqa: F401

log = logging.getLogger(__name__)


class PeerTimeout(RuntimeError):
    """Some ranks did not reach a cross-rank check within `train.dist_timeout_s`; the message names them."""


_monitor: dict[str, Any] = {}  # the gloo group that checks which ranks arrive, made once per process group


def _monitor_group() -> Any:
    """A gloo group over all ranks (the default group itself when that is gloo): `monitored_barrier`,
    which names the ranks that fail to arrive, exists on gloo only. Made at the first check, which every
    rank reaches in the same order."""
    if _monitor.get("world") is not dist.group.WORLD:
        group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        _monitor.update(world=dist.group.WORLD, group=group)
    return _monitor["group"]


def arrive(timeout_s: float) -> None:
    """Wait for every rank; raises PeerTimeout naming those that did not come within `timeout_s`."""
    rank = dist.get_rank()
    try:
        dist.monitored_barrier(_monitor_group(), timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as err:
        text = str(err)
        late = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", text)
        if rank == 0 and late:
            who = late.group(1).strip(", ")
            raise PeerTimeout(f"rank{'s' if ',' in who else ''} {who} of {dist.get_world_size()} did not reach "
                              f"the cross-rank check within train.dist_timeout_s={timeout_s:g} s: see that rank's "
                              "log (hung, crashed or stalled on I/O); raise train.dist_timeout_s if it is only "
                              "slow") from None
        if rank == 0:  # a peer's connection closed: it died before the check
            raise PeerTimeout("rank 0: a peer left before the cross-rank check: see the other ranks' logs") from None
        raise PeerTimeout(f"rank {rank}: rank 0 left or did not complete the cross-rank check within "
                          f"train.dist_timeout_s={timeout_s:g} s: see rank 0's log") from None


def agree(ok: bool, world: int, device: torch.device, timeout_s: float | None = None) -> bool:
    """True on every rank only if `ok` is True on every rank; also a barrier. With `timeout_s`, ranks that
    do not arrive in time are named (PeerTimeout) instead of failing the collective anonymously."""
    if world == 1:
        return ok
    if timeout_s is not None:
        arrive(timeout_s)
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def highest(value: int, world: int, device: torch.device, timeout_s: float | None = None) -> int:
    """The largest `value` of any rank, on every rank; a barrier whose late ranks are named, as `agree`'s."""
    if world == 1:
        return value
    if timeout_s is not None:
        arrive(timeout_s)
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


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
    _monitor.clear()
    AcceleratorState._reset_state(reset_partial_state=True)
    gc.collect()
    del group  # dropped with the GIL released; as the last reference, its destructor joins the threads


def resume_seed(seed: int, rank: int, step: int, stream: str) -> int:
    """A rank's seed for `stream` after a change of process count: a hash of (seed, rank, step), so no two
    ranks, and no two resumes, share a stream."""
    digest = hashlib.blake2b(f"hpcgan.resume.{stream}:{seed}:{rank}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class NewWorld:
    """What a reshard rule knows of a resume on another number of processes."""

    folder: Path  # the checkpoint
    state: TrainState  # loaded already: step, data position, and `world_size`, the writers' number
    seed: int
    rank: int
    world: int

    def seed_for(self, stream: str) -> int:
        return resume_seed(self.seed, self.rank, self.state.step, stream)


def resume_on_new_world(folder: Path, state: TrainState, parts: list[tuple[str, Any, Reshard]], *, seed: int,
                        rank: int, world: int, global_batch: int) -> str:
    """Continue `folder`, written by `state.world_size` processes, on `world`; returns what changed, in a line.

    The shared parts (weights, optimizers, EMA, `state`) are loaded already; each per-rank part of `parts`
    (the checkpoint manager's `rank_parts()`) is set by its own reshard rule, overriding a file this rank
    may have found.
    """
    new = NewWorld(folder, state, seed, rank, world)
    lines = [f"resuming with {_processes(world)} a checkpoint written by {state.world_size}: "
             f"{_batch_change(folder, global_batch, world)}"]
    lines += [reshard(part, new) for _, part, reshard in parts]
    return ", ".join(lines)


# Reshard rules (CheckpointManager.register_rank): each sets a per-rank part for a new world, and says how.
def from_global_position(reader: Reader, new: NewWorld) -> str:
    """Take the global data position (epoch, global batch index) rank 0 saved in the shared state."""
    position = global_position(new.state.data)
    reader.load_state_dict(position)
    line = f"data position epoch {position['epoch']} batch {position['batch']} kept"
    if not reader.world_invariant:
        line += (f" (this reader splits an epoch by process count: the rest of epoch {position['epoch']} "
                 f"may repeat or skip samples; exact again from epoch {position['epoch'] + 1})")
    return line


def rederive_rng(_: Any, new: NewWorld) -> str:
    """Seed this process's global RNG streams afresh from (seed, rank, step)."""
    seed_everything(new.seed_for("global"))
    return "RNG streams re-derived from (seed, rank, step)"


def carry_rank0_augment(augment: Any, new: NewWorld) -> str:
    """Take old rank 0's augmentation p, with the ADA tally of every old rank on rank 0 only (the next
    adjustment sums it over the ranks, as it would have), and a fresh RNG from (seed, rank, step)."""
    augment.load_state_dict(_merged_augment(new.folder, augment, new.state.world_size, new.rank,
                                            new.seed_for("augment")))
    return f"augmentation p={augment.p:.4g} kept"


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
