"""DCGAN (Radford et al. 2015), the reproducible baseline, generalised to 64 * 2**k pixels.

Each doubling of the resolution adds one up-sampling block to G and one strided block to D; channel
widths double towards the 4x4 end, capped at 8x the base width as in the original 64-pixel net.
D returns one logit per image: losses are computed on logits, which is autocast-safe, and
`torch.sigmoid(D(x))` gives the classic probability.

`model.spectral_norm` makes D usable on small data: every convolution is spectrally normalised
(Miyato et al. 2018) and D's BatchNorm is dropped, since the two fight over the layer's scale and
BatchNorm couples the real and the fake batch.

`model.conditional` adds a class embedding to G's input and a projection (Miyato & Koyama 2018) to D's
logit; with no classes the nets and their parameters are exactly the unconditional ones.
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
    """z (and, when conditional, a class) -> image.

    The class enters as a learned embedding of size nz concatenated to z, not multiplied into it: a
    product would rescale z per class (a latent dimension whose embedding entry is near 0 is dead for
    that class) and make z's prior class-dependent; concatenated, z keeps its N(0, I) meaning and the
    first transposed convolution learns how much the class weighs, for nz more input channels.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.nz, self.num_classes = cfg.nz, cfg.num_classes
        # N(0, 1) like z (DCGAN's init leaves embeddings alone), so both inputs start on one scale.
        self.embed = nn.Embedding(self.num_classes, cfg.nz) if self.num_classes else None
        widths = _widths(cfg.resolution, cfg.ngf)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(cfg.nz * (2 if self.num_classes else 1), widths[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(True),
        ]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], cfg.channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """`labels` (N,) int64 class indices, required when conditional."""
        if self.embed is not None:
            z = torch.cat([z.view(z.shape[0], self.nz), self.embed(labels)], dim=1)
        return self.net(z.view(z.shape[0], -1, 1, 1))


class Discriminator(nn.Module):
    """Image (and, when conditional, a class) -> logit. The final 4x4 convolution is the linear term on
    the last feature map h; a conditional D adds the projection <embed(y), sum_xy h>, so it judges how
    well an image fits its class rather than classifying it (Miyato & Koyama 2018)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        sn = cfg.spectral_norm
        conv = (lambda *a, **k: spectral_norm(nn.Conv2d(*a, **k))) if sn else nn.Conv2d
        widths = _widths(cfg.resolution, cfg.ndf)[::-1]
        self.num_classes = cfg.num_classes
        layers: list[nn.Module] = [conv(cfg.channels, widths[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [conv(c_in, c_out, 4, 2, 1, bias=False), *([] if sn else [nn.BatchNorm2d(c_out)]),
                       nn.LeakyReLU(0.2, True)]
        layers += [conv(widths[-1], 1, 4, 1, 0, bias=False)]
        self.net = nn.Sequential(*layers)
        self.project = None
        if self.num_classes:  # spectrally normalised with the convolutions: SN-GAN's projection D
            self.project = spectral_norm(nn.Embedding(self.num_classes, widths[-1])) if sn \
                else nn.Embedding(self.num_classes, widths[-1])
            _init_normal(self.project, 0.02)  # the final convolution's scale: neither logit term dominates

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) logits; `labels` (N,) int64 class indices, required when conditional."""
        if self.project is None:
            return self.net(x).flatten()
        h = self.net[:-1](x)
        return self.net[-1](h).flatten() + (self.project(labels) * h.sum(dim=(2, 3))).sum(dim=1)


def build(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    generator, discriminator = Generator(cfg), Discriminator(cfg)
    generator.apply(init_weights)
    discriminator.apply(init_weights)
    return generator, discriminator


def init_weights(module: nn.Module) -> None:
    """DCGAN init: conv weights ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02), shift 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        _init_normal(module, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _init_normal(module: nn.Module, std: float) -> None:
    if parametrize.is_parametrized(module, "weight"):  # spectral norm: initialise the raw weight
        nn.init.normal_(module.parametrizations.weight.original, 0.0, std)
    else:
        nn.init.normal_(module.weight, 0.0, std)
