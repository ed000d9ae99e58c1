"""Training throughput: hpcgan variants and the reference, timed in interleaved A/B repeats.

Each loop runs in its own process (`worker`). Each is warmed up once, then the repeats rotate through
all loops (order reversed every other repeat), one loop at a time, so that drift from other load on the
machine falls on all of them alike. A repeat times `steps` consecutive steps ending in a device sync; a
loop's result is the median of its repeats, with min and max. The reference keeps its iterator across
repeats, so its epoch boundaries (new DataLoader workers) land in the timed windows as often as in real
training.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from hpcgan.bench.reference import ReferenceDCGAN
from hpcgan.config import Config, build_config, flatten, to_dict
from hpcgan.train.precision import mixed_precision_here, precision_name

REFERENCE = "reference (dcgan/main.py)"
DEFAULTS = "hpcgan (defaults)"
GUARD_OFF = "hpcgan (defaults, guard off)"


@dataclass(frozen=True)
class Variant:
    """An hpcgan configuration to time, as overrides on top of the defaults (and the user's --set)."""

    name: str
    overrides: tuple[str, ...]


def variants(*, full: bool, bf16: bool, compile: bool) -> list[Variant]:
    """Defaults first (the headline); the full run adds the fast path's switches one by one; bf16 wherever
    the device does bf16 natively (it is a target of its own)."""
    out = [Variant(DEFAULTS, ()), Variant(GUARD_OFF, ("train.guard=false",))]  # what the divergence guard costs
    if full:
        out.append(Variant("hpcgan fp32 plain", ('train.mixed_precision="no"', "train.channels_last=false",
                                                 "train.fused_adam=false", "train.compile=false")))
    # The fp32 target's loop where the defaults train in bf16; where they train in fp32 it is the defaults
    # and is dropped as a duplicate.
    out.append(Variant("hpcgan fp32 channels_last", ('train.mixed_precision="no"', "train.channels_last=true",
                                                     "train.compile=false")))
    if bf16:
        out.append(Variant("hpcgan bf16 channels_last", ("train.mixed_precision=bf16", "train.channels_last=true",
                                                         "train.compile=false")))
    if full:  # every arch: the small-data DCGAN recipe and StyleGAN2 at the CPU quickstart's widths
        out.append(Variant("hpcgan dcgan sn+hinge+ada", ("model.spectral_norm=true", "train.loss=hinge",
                                                         "augment.mode=fixed", "augment.p=0.3")))
        out.append(Variant("hpcgan stylegan2 (4096/128)", ("model.arch=stylegan2", "model.channel_base=4096",
                                                           "model.channel_max=128", "model.w_dim=128",
                                                           "model.mapping_layers=2", "augment.mode=fixed",
                                                           "augment.p=0.3", "train.r1_gamma=0.05")))
    if compile:
        out.append(Variant("hpcgan fp32 channels_last compile", ('train.mixed_precision="no"',
                                                                 "train.channels_last=true", "train.compile=true")))
    return out


def resolve(base: Config, chosen: list[Variant]) -> list[tuple[Variant, Config]]:
    """Each variant's config; a variant whose training settings equal an earlier one's is dropped."""
    seen: list[dict] = []
    out = []
    for variant in chosen:
        cfg = build_config(base=to_dict(base), overrides=list(variant.overrides))
        settings = {k: v for k, v in flatten(cfg).items() if k.startswith("train.")}
        settings["train.mixed_precision"] = precision(cfg)  # auto is whatever it resolves to here
        if settings not in seen:
            seen.append(settings)
            out.append((variant, cfg))
    return out


def precision(cfg: Config) -> str:
    """The precision a Trainer in this process runs `cfg` in, named as the peak tables name it."""
    return precision_name(mixed_precision_here(cfg.train.mixed_precision))


class Loop(Protocol):
    """A training loop that can be told to take steps (hpcgan.bench.worker.LoopProcess)."""

    def warmup(self, steps: int) -> float | None:
        """Seconds the warm-up steps took, compilation included; None for no warm-up."""
        ...

    def images_per_s(self, steps: int) -> float:
        """Take `steps` steps, timed from the first to a device sync after the last."""
        ...


def reference_for(cfg: Config, root: Path, device: torch.device, workers: int = 2) -> ReferenceDCGAN:
    """The reference with hpcgan's net sizes, batch and optimizer settings: the same arithmetic."""
    m, t = cfg.model, cfg.train
    return ReferenceDCGAN(root, image_size=m.resolution, channels=m.channels, batch_size=t.batch_size, nz=m.nz,
                          ngf=m.ngf, ndf=m.ndf, lr=t.lr, beta1=t.beta1, workers=workers, seed=cfg.seed,
                          device=device)


@dataclass
class Measured:
    runs: list[float] = field(default_factory=list)  # images/s, one per repeat
    warmup_s: float | None = None  # the untimed first steps; with torch.compile, compilation is in here

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def summary(self) -> dict[str, float | list[float]]:
        return {"images_per_s": self.median, "min": min(self.runs), "max": max(self.runs),
                "spread": (max(self.runs) - min(self.runs)) / self.median, "runs": self.runs,
                "warmup_s": self.warmup_s}


def interleave(loops: dict[str, Loop], *, warmup: int, steps: int, repeats: int,
               after_repeat: Callable[[], None] = lambda: None) -> dict[str, Measured]:
    """`after_repeat` runs once per repeat, under the same load, e.g. to sample the matmul limit."""
    results = {name: Measured(warmup_s=loop.warmup(warmup)) for name, loop in loops.items()}
    order = list(loops)
    for repeat in range(repeats):
        for name in order if repeat % 2 == 0 else order[::-1]:
            results[name].runs.append(loops[name].images_per_s(steps))
        after_repeat()
    return results
