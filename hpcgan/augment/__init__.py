"""Augmentation against discriminator overfitting: differentiable ops and the stateful, adaptive pipe."""

import torch

from hpcgan.augment.ops import ALL_OPS
from hpcgan.augment.pipe import AugmentPipe
from hpcgan.config import AugmentConfig

__all__ = ["ALL_OPS", "AugmentPipe", "build_augment"]


def build_augment(cfg: AugmentConfig, *, seed: int, rank: int, device: torch.device) -> AugmentPipe | None:
    """The pipe for `augment.mode`, or None when augmentation is off."""
    return AugmentPipe(cfg, seed=seed, rank=rank, device=device) if cfg.mode != "off" else None
