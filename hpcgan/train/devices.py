"""Which GPU this process trains on, from what it actually sees.

SLURM may bind GPUs per task (`--gpus-per-task`, `--gpu-bind`): each process then sees only its own
GPU(s), as cuda:0.., through CUDA_VISIBLE_DEVICES, while LOCAL_RANK/SLURM_LOCALID still count the tasks
of the node; a node-local rank used as the device index would name a GPU the process cannot see.
Accelerate takes LOCAL_RANK as the device index (and for DDP's device_ids), so the choice is written
back there before the Accelerator exists.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)


class DeviceChoice(NamedTuple):
    index: int | None  # the cuda index in this process's numbering; None: no GPU visible
    why: str  # one line for the log
    shared: bool = False  # more processes on the node than GPUs they see: worth a warning


def local_rank(env: Mapping[str, str]) -> int:
    """This process's rank on its node: LOCAL_RANK (torchrun, submitit), else SLURM_LOCALID (srun), else 0."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        if env.get(key, "").strip().isdigit():
            return int(env[key])
    return 0


def tasks_on_node(env: Mapping[str, str]) -> int | None:
    """Processes on this node, when the environment says: LOCAL_WORLD_SIZE, else SLURM_NTASKS_PER_NODE
    (its first entry, e.g. '4(x2)')."""
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(key, "").split("(")[0].split(",")[0].strip()
        if value.isdigit():
            return int(value)
    return None


def choose_cuda_device(env: Mapping[str, str], visible: int) -> DeviceChoice:
    """The GPU for this process, a pure function of its environment and torch.cuda.device_count().

    One GPU visible: it (cuda:0), whatever the local rank (per-task binding). Several: local rank modulo
    their number (every task sees all the node's GPUs; with more tasks than GPUs, tasks share them).
    """
    if visible <= 0:
        return DeviceChoice(None, "no GPU visible: CPU")
    rank = local_rank(env)
    listed = env.get("CUDA_VISIBLE_DEVICES", "")
    if visible == 1:
        bound = f" (CUDA_VISIBLE_DEVICES={listed})" if listed else ""
        return DeviceChoice(0, f"cuda:0, the one GPU this process sees{bound}, local rank {rank}")
    index = rank % visible
    tasks = tasks_on_node(env)
    if tasks is not None and tasks > visible:
        return DeviceChoice(index, f"cuda:{index} of {visible}: {tasks} processes on this node share {visible} GPUs "
                                   f"(local rank {rank}); ask for one GPU per task", shared=True)
    return DeviceChoice(index, f"cuda:{index} of {visible} (local rank {rank})")


def bind_cuda_device() -> DeviceChoice:
    """Choose this process's GPU, make it current, and tell Accelerate through LOCAL_RANK."""
    choice = choose_cuda_device(os.environ, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if choice.index is not None:
        torch.cuda.set_device(choice.index)
        if "LOCAL_RANK" in os.environ:
            os.environ["LOCAL_RANK"] = str(choice.index)
        log.log(logging.WARNING if choice.shared else logging.DEBUG, "device: %s", choice.why)
    return choice
