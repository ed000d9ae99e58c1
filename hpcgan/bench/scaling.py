"""Weak scaling over gloo on one CPU machine, and a projection of data-parallel scaling past one node.

Weak scaling keeps the per-process batch: 1 process on 1 core against 2 processes on 1 core each
(OMP_NUM_THREADS=1), both started by `torch.distributed.run` so that the two runs differ only in the
world size. Efficiency = images/s(2) / (2 x images/s(1)). Where SLURM has two idle nodes in its default
partition (the local cluster of `slurm/local/start.sh --nodes 2` here), the same 2 processes also run
as one task on each node, started by `srun` with the rendezvous taken from the SLURM environment as
`hpcgan train` takes it: the 2-node figure, traffic crossing the nodes' network.

The projection is arithmetic on measured numbers: the step time, and the gradient bytes DDP all-reduces
per step (D's after the D update, G's after the G update; D's gradients from the G update are not
reduced). The all-reduce model is ring bandwidth plus tree latency, with no overlap with backward, so
the efficiencies are lower bounds for DDP, which overlaps.

Run as `python -m hpcgan.bench.scaling` this module is the worker that each process executes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from hpcgan.config import Config, ModelConfig, build_config, flatten
from hpcgan.models import build_models
from hpcgan.train import Trainer
from hpcgan.train.distributed import release_distributed


@dataclass(frozen=True)
class Interconnect:
    """Achievable all-reduce bus bandwidth (GB/s per GPU) and per-hop latency; stated, not measured."""

    name: str
    intra_node_gbs: float = 370.0  # NVLink 4 (H100 SXM), NCCL all-reduce bus bandwidth
    inter_node_gbs: float = 45.0  # one 400 Gb/s NDR InfiniBand NIC per GPU
    gpus_per_node: int = 8
    hop_latency_s: float = 10e-6


H100_AT_TARGET = 0.35 * 989.4e12  # FLOP/s: the GPU target on an H100 SXM's dense bf16 peak
DGX_H100 = Interconnect("8x H100 SXM per node, NVLink 4 inside, 400 Gb/s NDR InfiniBand per GPU between nodes")


def allreduce_s(nbytes: float, gpus: int, link: Interconnect) -> float:
    if gpus == 1:
        return 0.0
    bandwidth = (link.intra_node_gbs if gpus <= link.gpus_per_node else link.inter_node_gbs) * 1e9
    return 2 * (gpus - 1) / gpus * nbytes / bandwidth + 2 * math.ceil(math.log2(gpus)) * link.hop_latency_s


def project(step_s: float, grad_bytes: dict[str, int], gpus: tuple[int, ...] = (8, 64, 512),
            link: Interconnect = DGX_H100) -> list[dict[str, float]]:
    """Expected weak-scaling efficiency at each GPU count for a per-GPU step of `step_s` seconds."""
    rows = []
    for n in gpus:
        comm = sum(allreduce_s(b, n, link) for b in grad_bytes.values())
        rows.append({"gpus": n, "allreduce_s": comm, "efficiency": step_s / (step_s + comm)})
    return rows


def grad_bytes(model: ModelConfig) -> dict[str, int]:
    """Bytes all-reduced per step for G and D: every parameter's gradient, in fp32 (autocast keeps
    parameters, hence gradients, in fp32)."""
    generator, discriminator = build_models(model)
    return {"G": 4 * sum(p.numel() for p in generator.parameters()),
            "D": 4 * sum(p.numel() for p in discriminator.parameters())}


def projections(model: ModelConfig, measured: tuple[str, float], flops_per_image: dict[int, float],
                link: Interconnect = DGX_H100) -> dict[str, Any]:
    """Scaling rows for the step measured here, and for an H100 at the GPU target (35% bf16 MFU, an
    assumption) at each benchmarked resolution with 128 and 512 images per GPU."""
    basis, step_s = measured
    grads = grad_bytes(model)
    bases = [{"basis": basis, "step_s": step_s, "grad_bytes": grads, "rows": project(step_s, grads, link=link)}]
    for resolution, per_image in flops_per_image.items():
        grads = grad_bytes(replace(model, resolution=resolution))
        for batch in (128, 512):
            step_s = per_image * batch / H100_AT_TARGET
            bases.append({"basis": f"H100 SXM at 35% bf16 MFU (assumed), {resolution}px, batch {batch} per GPU",
                          "step_s": step_s, "grad_bytes": grads, "rows": project(step_s, grads, link=link)})
    return {"interconnect": asdict(link), "bases": bases}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def images_per_s(cfg: Config, processes: int, workdir: Path, *, warmup: int, steps: int) -> float:
    """Train with `processes` gloo ranks at `cfg`'s per-process batch; images/s over all ranks."""
    out = workdir / f"scaling-{processes}.json"
    overrides = [f"{k}={json.dumps(v)}" for k, v in flatten(cfg).items()]
    overrides.append(f"train.batch_size={cfg.train.batch_size * processes}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "hpcgan.bench.scaling",
           str(out), str(workdir / f"scaling-run-{processes}"), str(warmup), str(steps), *overrides]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{processes}-process run failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(out.read_text())["images_per_s"]


def idle_slurm_nodes() -> list[str]:
    """Idle nodes of SLURM's default partition; none where SLURM is not reachable."""
    if not shutil.which("sinfo"):
        return []
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N %P"], capture_output=True, text=True,
                             timeout=30).stdout
    except subprocess.TimeoutExpired:
        return []
    return sorted({line.split()[0] for line in out.splitlines() if line.split()[-1].endswith("*")})


def images_per_s_two_nodes(cfg: Config, workdir: Path, *, warmup: int, steps: int) -> float:
    """`images_per_s` with 2 processes as one SLURM task on each of two nodes."""
    out = workdir / "scaling-2-nodes.json"
    overrides = [f"{k}={json.dumps(v)}" for k, v in flatten(cfg).items()]
    overrides.append(f"train.batch_size={cfg.train.batch_size * 2}")
    cmd = ["srun", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=30", "--job-name=hpcgan-scaling",
           sys.executable, "-m", "hpcgan.bench.scaling", str(out), str(workdir / "scaling-run-2-nodes"),
           str(warmup), str(steps), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SUBMITIT_EXECUTOR": "slurm"}  # the environment sbatch jobs get
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"2-node run failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(out.read_text())["images_per_s"]


def weak_scaling(cfg: Config, workdir: Path, *, warmup: int, steps: int) -> dict[str, Any]:
    one = images_per_s(cfg, 1, workdir, warmup=warmup, steps=steps)
    two = images_per_s(cfg, 2, workdir, warmup=warmup, steps=steps)
    result: dict[str, Any] = {"backend": "gloo", "threads_per_process": 1, "batch_per_process": cfg.train.batch_size,
                              "images_per_s_1": one, "images_per_s_2": two, "efficiency": two / (2 * one)}
    nodes = idle_slurm_nodes()
    if len(nodes) < 2:
        result["two_nodes"] = {"skipped": "SLURM has fewer than 2 idle nodes in its default partition "
                                          "(here: bash slurm/local/start.sh --nodes 2)"}
        return result
    rate = images_per_s_two_nodes(cfg, workdir, warmup=warmup, steps=steps)
    result["two_nodes"] = {"nodes": nodes[:2], "tasks_per_node": 1, "images_per_s": rate,
                           "efficiency": rate / (2 * one)}
    return result


def _worker(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="one rank of a weak-scaling run")  # positional only: torchrun
    parser.add_argument("out")                                                     # would claim --options
    parser.add_argument("run")
    parser.add_argument("warmup", type=int)
    parser.add_argument("steps", type=int)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
        from hpcgan.launch.job import export_distributed_env
        export_distributed_env()
    _measure(Trainer(build_config(overrides=args.overrides), args.run), Path(args.out), args.warmup, args.steps)
    release_distributed()


def _measure(trainer: Trainer, out: Path, warmup: int, steps: int) -> None:
    for _ in range(warmup):
        trainer.step()
    trainer.acc.wait_for_everyone()
    start = time.perf_counter()
    for _ in range(steps):
        stats = trainer.step()
    stats.tolist()
    trainer.acc.wait_for_everyone()
    elapsed = time.perf_counter() - start
    if trainer.is_main:
        rate = steps * trainer.cfg.train.batch_size / elapsed
        out.write_text(json.dumps({"images_per_s": rate, "world": trainer.world}))


if __name__ == "__main__":
    _worker(sys.argv[1:])
