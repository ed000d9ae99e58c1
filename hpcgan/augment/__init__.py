"""Augmentation against discriminator overfitting: differentiable ops and the stateful, adaptive pipe."""

from hpcgan.augment.ops import ALL_OPS
from hpcgan.augment.pipe import AugmentPipe

__all__ = ["ALL_OPS", "AugmentPipe"]
