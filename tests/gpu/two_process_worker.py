"""`two_process_worker.py OUT BACKEND`, two ranks started by tests/gpu/test_gpu.py: gloo with both on cuda:0
(LOCAL_RANK=0 for both), or NCCL with one GPU each. Each trains a few DDP steps, then the ranks compare a
checksum of their weights; rank 0 prints "ranks equal"."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import TINY  # noqa: E402

from hpcgan.config import build_config  # noqa: E402
from hpcgan.train import Trainer  # noqa: E402
from hpcgan.train.distributed import release_distributed  # noqa: E402


def main(out: str, backend: str) -> None:
    dist.init_process_group(backend)  # NCCL refuses two ranks on one device; Accelerate keeps this group
    data = torch.randint(0, 256, (64, 1, 64, 64), dtype=torch.uint8)
    path = Path(out) / "data.pt"
    if dist.get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)
    dist.barrier()
    cfg = build_config(overrides=[f"data.path={path}", *TINY, "train.steps=4", 'train.mixed_precision="bf16"'])
    trainer = Trainer(cfg, Path(out) / "run")
    assert trainer.device.type == "cuda", trainer.device
    assert trainer.fit() == 0
    total = torch.stack([p.detach().double().sum() for p in trainer.generator.parameters()]).sum()
    total = total.to(trainer.device if backend == "nccl" else "cpu")
    sums = [torch.zeros_like(total) for _ in range(2)]
    dist.all_gather(sums, total)
    if dist.get_rank() == 0:
        print("ranks equal" if torch.equal(sums[0], sums[1]) else f"ranks differ: {sums}", flush=True)
    release_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
