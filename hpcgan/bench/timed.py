"""One side of `hpcgan bench --quality`: train for a budget of seconds, snapshotting samples of fixed latents.

Each side runs in a fresh process (`python -m hpcgan.bench.timed SPEC.json`), so neither pays for the
other's memory, allocator state or DataLoader forks (see `worker`). The clock counts training only: it
stops for every snapshot (sampling, the copy to uint8, the write) and restarts after. On a GPU the host
runs ahead of the device, so the clock is read after a device sync, once per snapshot interval.

The spec: {"side": "hpcgan" | "reference", "config": {...}, "folder": DIR, "root": IMAGEFOLDER (reference),
"budget_s": S, "every_s": S, "samples": N, "seed": K}. The side's folder receives `snapshot-NNN.pt`
(uint8 (N, C, H, W)) and `snapshots.json`, the index the parent scores from.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from hpcgan.bench.flops import sync
from hpcgan.bench.throughput import reference_for
from hpcgan.config import Config, build_config
from hpcgan.data import pixels
from hpcgan.train.precision import precision_name
from hpcgan.train.samples import generate

INDEX = "snapshots.json"


class Side(Protocol):
    device: torch.device
    precision: str  # what the training arithmetic runs in: fp32 | bf16 | fp16

    @property
    def generator(self) -> torch.nn.Module:
        """What samples are drawn from."""
        ...

    def step(self) -> int:
        """One training iteration; returns the images it trained on."""
        ...

    def finite(self) -> bool:
        """False once a training statistic went non-finite (reads device values: a sync)."""
        ...

    def close(self) -> None:
        ...


class HpcganSide:
    """The preset's `Trainer`; samples come from its EMA generator."""

    def __init__(self, cfg: Config, folder: Path) -> None:
        from hpcgan.train import Trainer

        self.trainer = Trainer(cfg, folder / "run")
        self.device = self.trainer.device
        self.precision = precision_name(self.trainer.precision)
        self._stats: torch.Tensor | None = None

    @property
    def generator(self) -> torch.nn.Module:
        return self.trainer.sample_generator

    def step(self) -> int:
        self._stats = self.trainer.step()
        return self.trainer.cfg.train.batch_size

    def finite(self) -> bool:
        return self._stats is None or bool(torch.isfinite(self._stats).all())

    def close(self) -> None:
        pass


class ReferenceSide:
    """The classic loop; samples come from its G in eval mode (BatchNorm running statistics)."""

    def __init__(self, cfg: Config, root: Path) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = "fp32"
        self.reference = reference_for(cfg, root, self.device)
        self._iterations = self.reference.iterations()
        self._finite = True

    @property
    def generator(self) -> torch.nn.Module:
        return self.reference.netG

    def step(self) -> int:
        stats = next(self._iterations)
        self._finite = self._finite and stats.finite()
        return stats.batch_size

    def finite(self) -> bool:
        return self._finite

    def close(self) -> None:
        self._iterations.close()  # ends the epoch's DataLoader workers


def latents(samples: int, nz: int, seed: int) -> torch.Tensor:
    """The fixed latents of every snapshot: the same for both sides when their latent sizes agree."""
    return torch.randn(samples, nz, generator=torch.Generator().manual_seed(seed))


def train_for(side: Side, z: torch.Tensor, budget_s: float, every_s: float, folder: Path,
              label: str) -> dict[str, Any]:
    """Train until `budget_s` seconds of training, snapshotting at 0, after each `every_s` and at the end.

    A step is never cut: a snapshot lands after the step that crosses its time and records the clock
    then. A side whose statistics go non-finite stops at the next snapshot time, without that snapshot.
    """
    clock, due, steps, images, sampling_s = 0.0, 0.0, 0, 0, 0.0
    points: list[dict[str, Any]] = []
    diverged: dict[str, Any] | None = None
    while True:
        if not side.finite():
            diverged = {"seconds": clock, "step": steps}
            break
        if clock >= min(due, budget_s):
            paused = time.perf_counter()
            name = f"snapshot-{len(points):03d}.pt"
            torch.save(pixels.to_uint8(generate(side.generator, z)), folder / name)
            points.append({"seconds": clock, "step": steps, "images_seen": images, "file": name})
            sampling_s += time.perf_counter() - paused
            print(f"[quality {label} {clock:7.1f} / {budget_s:g} s] step {steps}, snapshot {len(points) - 1}",
                  file=sys.stderr, flush=True)
            due = every_s * (math.floor(clock / every_s) + 1)
        if clock >= budget_s:
            break
        start = time.perf_counter()
        while clock + time.perf_counter() - start < min(due, budget_s):
            images += side.step()
            steps += 1
        sync(side.device)
        clock += time.perf_counter() - start
    return {"points": points, "train_s": clock, "steps": steps, "images_seen": images,
            "images_per_s": images / clock if clock else None, "sampling_s": sampling_s, "diverged": diverged}


def run_side(spec: dict[str, Any]) -> dict[str, Any]:
    cfg, folder = build_config(base=spec["config"]), Path(spec["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    side: Side = HpcganSide(cfg, folder) if spec["side"] == "hpcgan" else ReferenceSide(cfg, Path(spec["root"]))
    try:
        z = latents(spec["samples"], cfg.model.nz, spec["seed"])
        if spec["side"] == "reference":
            z = z.view(len(z), cfg.model.nz, 1, 1)
        result = train_for(side, z.to(side.device), spec["budget_s"], spec["every_s"], folder, spec["side"])
    finally:
        side.close()
    result.update(device=side.device.type, precision=side.precision)
    (folder / INDEX).write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    run_side(json.loads(Path(sys.argv[1]).read_text()))


if __name__ == "__main__":
    main()
