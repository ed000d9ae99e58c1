"""Classes in a run: `model.conditional` resolved against the data, and the labels G and D are given.

Training labels are the real batch's (D on reals, and G with `train.class_balance=data`) or drawn from
the global RNG stream the latents use (`balanced`), so a resumed run draws the same ones. Generation
outside training (grids, in-loop metrics, export) allocates labels deterministically instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from hpcgan.config import Config, ConfigError
from hpcgan.data import shards
from hpcgan.data.images import folder_labels


def resolve_classes(cfg: Config, classes: Sequence[str]) -> Config:
    """`cfg` with `model.conditional` as the number of the data's `classes` (a copy; an unconditional
    config comes back as it is). The run saves this number, so its generator is rebuilt without the data."""
    wanted = cfg.model.conditional
    if not wanted:
        return cfg
    shown = "true" if wanted is True else wanted
    if not classes:
        raise ConfigError(f"model.conditional={shown}: {cfg.data.path} has no class labels; prepare it with "
                          "hpcgan prepare --labels (docs/data.md), or set model.conditional=false")
    if wanted is not True and wanted != len(classes):
        raise ConfigError(f"model.conditional={wanted}, but {cfg.data.path} has {len(classes)} classes "
                          f"({', '.join(classes)}): set model.conditional=true or {len(classes)}")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, conditional=len(classes)))


def run_classes(cfg: Config, classes: Sequence[str]) -> dict[str, int]:
    """A conditional run's classes, with their training images, in label order ({} when unconditional):
    kept in its state, so that evaluation and export draw classes as in the data without the data at hand."""
    return class_counts(cfg.data.path, classes) if cfg.model.num_classes else {}


def class_counts(path: str, classes: Sequence[str]) -> dict[str, int]:
    """Training images per class of the data at `path` (a shard folder or an image folder), in label order."""
    if shards.is_shard_dir(Path(path)):
        counted = shards.read_manifest(Path(path)).get("class_counts", {}).get("train", {})
        return {name: int(counted.get(name, 0)) for name in classes}
    labels, _ = folder_labels(path)
    return dict(zip(classes, torch.bincount(labels, minlength=len(classes)).tolist()))


def check_classes(saved: dict[str, int], classes: Sequence[str], data: str) -> None:
    """A resumed conditional run's labels must mean what they meant: the same class names in the same order."""
    if list(saved) != list(classes):
        raise ConfigError(f"{data} has classes {', '.join(classes)}, the checkpoint was trained with "
                          f"{', '.join(saved)}: label indices would change meaning; train into a new --out folder")


def step_labels(real_labels: torch.Tensor, num_classes: int,
                balance: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(D's labels for the real batch, the classes G is asked for); (None, None) when unconditional.
    G's are the real batch's (`data`: G and D see the data's class frequencies) or uniform over the
    classes (`balanced`), drawn on the device from the global RNG stream the latents use."""
    if not num_classes:
        return None, None
    if balance == "balanced":
        return real_labels, torch.randint(num_classes, real_labels.shape, device=real_labels.device)
    return real_labels, real_labels


def allocate(n: int, weights: Sequence[float]) -> torch.Tensor:
    """`n` int64 labels in class order, each class's share proportional to its weight (largest remainder:
    the counts are exact, and the same for the same inputs). A class of weight 0 gets none."""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if len(w) == 0 or not (w >= 0).all() or w.sum() <= 0:
        raise ValueError(f"class weights {list(weights)}: need at least one positive weight and none negative")
    quota = w / w.sum() * n
    counts = quota.floor().long()
    short = n - int(counts.sum())
    counts[torch.argsort(quota - counts, descending=True, stable=True)[:short]] += 1
    return torch.repeat_interleave(torch.arange(len(w)), counts)
