"""Run under torch.distributed.run by tests/test_ddp.py and tests/test_world_size.py.

`ddp_worker.py OUT STEPS KEY=VALUE...` trains a few DDP steps and checks, after every step, that all ranks
hold bit-identical G and D parameters (gathered over gloo); rank 0 writes OUT/ddp_report.json.
`ddp_worker.py --record RUN SEEN KEY=VALUE...` trains (or resumes) RUN to `train.steps` and writes the
samples each rank drew at each step to SEEN/seen-<world>-<rank>.json (images whose pixels all hold 5 * i).
Either way the process group is released at the end and no gloo thread may outlive it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hpcgan.cli import setup_logging
from hpcgan.config import build_config
from hpcgan.data import Batch
from hpcgan.train import Trainer
from hpcgan.train.distributed import release_distributed


def sample_ids(batch: torch.Tensor) -> list[int]:
    """The index i of each image of a batch drawn from `indexed_images`."""
    return [round(v / 5) for v in ((batch[:, 0, 0, 0].float() + 1) * 127.5).tolist()]


def indexed_images(n: int, size: int = 64) -> torch.Tensor:
    """n uint8 images, image i filled with 5 * i: flips leave it as it is, and a batch tells which it holds."""
    assert 5 * (n - 1) <= 255
    return (torch.arange(n, dtype=torch.uint8) * 5).view(n, 1, 1, 1).expand(n, 1, size, size).contiguous()


def record_samples(trainer: Trainer, seen: list[dict[str, Any]]) -> None:
    """Append {step, rank, world, samples} to `seen` for every batch `trainer` draws."""
    draw = trainer.reader.next_batch

    def next_batch() -> Batch:
        batch = draw()
        seen.append({"step": trainer.state.step, "rank": trainer.rank, "world": trainer.world,
                     "samples": sample_ids(batch.images)})
        return batch

    trainer.reader.next_batch = next_batch


def gloo_threads() -> list[str]:
    """Names of this process's threads that belong to a gloo process group."""
    tasks = Path("/proc/self/task")
    names = [(t / "comm").read_text().strip() for t in tasks.iterdir()] if tasks.is_dir() else []
    return [n for n in names if "gloo" in n]


def equal_weights(out: str, steps: int, overrides: list[str]) -> list[dict[str, Any]]:
    """Per step and net: whether every rank holds the same parameters, and their norm."""
    trainer = Trainer(build_config(overrides=overrides), out)
    assert trainer.world == 2 and dist.get_backend() == "gloo"
    assert not trainer.D.broadcast_buffers  # the BatchNorm/DDP trap, handled on purpose
    report = []
    for _ in range(steps):
        stats = trainer.step()
        assert torch.isfinite(stats).all()
        for name, net in (("G", trainer.G), ("D", trainer.D)):
            flat = torch.cat([p.detach().flatten() for p in net.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(trainer.world)]
            dist.all_gather(gathered, flat)
            report.append({"step": trainer.state.step, "net": name,
                           "equal": bool(torch.equal(gathered[0], gathered[1])), "norm": float(flat.norm())})
    return report


def record(run: str, seen_dir: str, overrides: list[str]) -> None:
    """Train or resume `run` to `train.steps`, writing the samples this rank drew into `seen_dir`."""
    trainer = Trainer(build_config(overrides=overrides), run)
    seen: list[dict[str, Any]] = []
    record_samples(trainer, seen)
    assert trainer.fit() == 0
    Path(seen_dir, f"seen-{trainer.world}-{trainer.rank}.json").write_text(json.dumps(seen))


def main(argv: list[str]) -> None:
    setup_logging()
    if argv[0] == "--record":
        record(argv[1], argv[2], argv[3:])
    else:
        out, steps, *overrides = argv
        report = equal_weights(out, int(steps), overrides)
        if int(os.environ["RANK"]) == 0:
            Path(out, "ddp_report.json").write_text(json.dumps(report))
    release_distributed()
    assert not gloo_threads(), f"gloo threads outlive release_distributed: {gloo_threads()}"


if __name__ == "__main__":
    main(sys.argv[1:])
