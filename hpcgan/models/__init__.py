"""Generator and discriminator architectures: one module per arch, chosen by `model.arch`.

Each arch module exposes `build(cfg: ModelConfig) -> (G, D)`: G maps (N, nz) latents to (N, C, R, R)
images in [-1, 1], D maps images to one logit each. With `cfg.num_classes` > 0 both also take (N,) int64
class labels, `G(z, labels)` and `D(x, labels)`, and G carries `num_classes`. Adding an arch is one
module and one line here.
"""

from __future__ import annotations

import importlib

from torch import nn

from hpcgan.config import ModelConfig

ARCHS = {
    "dcgan": "hpcgan.models.dcgan",
    "fastgan": "hpcgan.models.fastgan",
    "stylegan2": "hpcgan.models.stylegan2",
}

__all__ = ["ARCHS", "build_models", "build_generator"]


def build_models(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """Freshly initialised (G, D); call under a seeded RNG for reproducible weights."""
    return importlib.import_module(ARCHS[cfg.arch]).build(cfg)


def build_generator(cfg: ModelConfig) -> nn.Module:
    """G alone, e.g. to load trained weights into."""
    return build_models(cfg)[0]
