"""DCGAN (Radford et al. 2015), the reproducible baseline, generalised to 64 * 2**k pixels.

Each doubling of the resolution adds one up-sampling block to G and one strided block to D; channel
widths double towards the 4x4 end, capped at 8x the base width as in the original 64-pixel net.
D returns one logit per image: losses are computed on logits, which is autocast-safe, and
`torch.sigmoid(D(x))` gives the classic probability.

`model.spectral_norm` makes D usable on small data: every convolution is spectrally normalised
(Miyato et al. 2018) and D's BatchNorm is dropped, since the two fight over the layer's scale and
BatchNorm couples the real and the fake batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from hpcgan.config import ModelConfig


def _widths(resolution: int, base: int) -> list[int]:
    """Channels of the feature maps from 4x4 up to resolution/2."""
    levels = int(math.log2(resolution)) - 2
    return [base * min(2 ** (levels - 1 - i), 8) for i in range(levels)]


class Generator(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.nz = cfg.nz
        widths = _widths(cfg.resolution, cfg.ngf)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(cfg.nz, widths[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(True),
        ]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], cfg.channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], self.nz, 1, 1))


class Discriminator(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        sn = cfg.spectral_norm
        conv = (lambda *a, **k: spectral_norm(nn.Conv2d(*a, **k))) if sn else nn.Conv2d
        widths = _widths(cfg.resolution, cfg.ndf)[::-1]
        layers: list[nn.Module] = [conv(cfg.channels, widths[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [conv(c_in, c_out, 4, 2, 1, bias=False), *([] if sn else [nn.BatchNorm2d(c_out)]),
                       nn.LeakyReLU(0.2, True)]
        layers += [conv(widths[-1], 1, 4, 1, 0, bias=False)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


def build(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    generator, discriminator = Generator(cfg), Discriminator(cfg)
    generator.apply(init_weights)
    discriminator.apply(init_weights)
    return generator, discriminator


def init_weights(module: nn.Module) -> None:
    """DCGAN init: conv weights ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02), shift 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        if parametrize.is_parametrized(module, "weight"):  # spectral norm: initialise the raw weight
            nn.init.normal_(module.parametrizations.weight.original, 0.0, 0.02)
        else:
            nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
