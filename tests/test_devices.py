"""The GPU a process picks, from the environment as SLURM and torchrun set it and the GPUs it sees."""

from __future__ import annotations

import pytest

from hpcgan.train.devices import choose_cuda_device


def slurm_task(localid: int, ntasks_per_node: int, **extra: str) -> dict[str, str]:
    """What srun + submitit's TorchDistributedEnvironment export for one task."""
    return {"SLURM_LOCALID": str(localid), "LOCAL_RANK": str(localid), "SLURM_NTASKS_PER_NODE": str(ntasks_per_node),
            "SLURM_GPUS_ON_NODE": "4", **extra}


@pytest.mark.parametrize("env, visible, index", [
    # --gpus-per-task=1 / --gpu-bind=single:1: task 3 sees only its GPU, as cuda:0 (cgroup-constrained or not)
    (slurm_task(3, 4, CUDA_VISIBLE_DEVICES="3", SLURM_STEP_GPUS="3"), 1, 0),
    (slurm_task(3, 4, CUDA_VISIBLE_DEVICES="0", SLURM_STEP_GPUS="3"), 1, 0),
    # --gpus-per-node=4, no binding: every task sees the 4 GPUs, the local rank picks one
    (slurm_task(2, 4, CUDA_VISIBLE_DEVICES="0,1,2,3", SLURM_STEP_GPUS="0,1,2,3"), 4, 2),
    # --gpus-per-task=2: task 1 sees its own two
    (slurm_task(1, 2, CUDA_VISIBLE_DEVICES="2,3", SLURM_STEP_GPUS="2,3"), 2, 1),
    # CUDA_VISIBLE_DEVICES lists fewer GPUs than local tasks: 8 tasks share 4 (and are told so)
    (slurm_task(6, 8, CUDA_VISIBLE_DEVICES="0,1,2,3"), 4, 2),
    # plain srun without submitit's LOCAL_RANK; torchrun without SLURM; one process alone
    ({"SLURM_LOCALID": "1", "CUDA_VISIBLE_DEVICES": "0,1"}, 2, 1),
    ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, 2, 1),
    ({}, 2, 0),
])
def test_the_device_is_one_the_process_sees(env, visible, index):
    choice = choose_cuda_device(env, visible)
    assert choice.index == index and 0 <= choice.index < visible
    assert choice.shared == (env.get("SLURM_NTASKS_PER_NODE") == "8")


def test_no_gpu_visible_means_cpu():
    assert choose_cuda_device(slurm_task(0, 2, CUDA_VISIBLE_DEVICES=""), 0).index is None


def test_the_reason_names_the_binding():
    why = choose_cuda_device(slurm_task(3, 4, CUDA_VISIBLE_DEVICES="3"), 1).why
    assert why == "cuda:0, the one GPU this process sees (CUDA_VISIBLE_DEVICES=3), local rank 3"
    assert "8 processes on this node share 4 GPUs" in choose_cuda_device(slurm_task(6, 8), 4).why
