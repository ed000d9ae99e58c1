"""Generator and discriminator architectures, built from `ModelConfig`."""

from __future__ import annotations

from torch import nn

from hpcgan.config import ModelConfig
from hpcgan.models.dcgan import Discriminator, Generator, init_weights

__all__ = ["Discriminator", "Generator", "build_models", "init_weights"]


def build_models(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """Freshly initialised (G, D); call under a seeded RNG for reproducible weights."""
    generator, discriminator = Generator(cfg), Discriminator(cfg)
    generator.apply(init_weights)
    discriminator.apply(init_weights)
    return generator, discriminator
