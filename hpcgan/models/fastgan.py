"""FastGAN (Liu et al. 2021): the few-shot, low-compute recipe, at 64 * 2**k pixels.

Built for a few hundred to a few thousand images and a small compute budget, which is the quickstart's
situation on a CPU:
- G upsamples with nearest-neighbour + 3x3 convolutions and GLU gates; its low-resolution blocks add
  learned per-pixel noise (variety at no cost). Skip-layer excitation (SLE) lets a coarse feature map
  gate the channels of a map eight times finer: global layout steers fine texture through a shortcut
  that costs one pooled 4x4 convolution, instead of a residual path through every level.
- D is spectrally normalised with half-residual down blocks, and is self-supervised: two small
  decoders rebuild the real image from D's 8x8 features and a random quarter of it from the 16x16
  features. D must keep what describes a real slice rather than a few cues that tell real from fake,
  which is what lets it train on little data without collapsing into memorisation. The paper scores the
  reconstructions with LPIPS; LPIPS needs downloaded weights, so here it is an L1 distance on pixels.

`model.conditional` adds a class embedding to G's input and a projection (Miyato & Koyama 2018) to D's
logit, as in the DCGAN module. The reconstruction loss is returned by `D(x, labels, reconstruct=True)`
and added to D's loss by the training loop on real images only (`D.self_supervised` says it exists).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from hpcgan.config import ModelConfig
from hpcgan.models.dcgan import init_weights

def _width(size: int, base: int) -> int:
    """Channels of a size x size feature map: the base width at 32 px, doubling towards 4 px and halving
    towards the image (at least 8), so every level costs about the same."""
    return max(base * 32 // size, 8)


def _sn_conv(*args, **kwargs) -> nn.Module:
    return spectral_norm(nn.Conv2d(*args, **kwargs))


class NoiseInjection(nn.Module):
    """Adds per-pixel Gaussian noise scaled by a learned scalar (starts at 0: off until it helps)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
        return x + self.weight.to(x.dtype) * noise


def _up_block(c_in: int, c_out: int, noisy: bool) -> nn.Sequential:
    """x2 nearest upsampling, then one (or, with noise, two) 3x3 convolution + BatchNorm + GLU."""
    layers: list[nn.Module] = [nn.Upsample(scale_factor=2, mode="nearest"),
                               nn.Conv2d(c_in, 2 * c_out, 3, 1, 1, bias=False)]
    if noisy:
        layers += [NoiseInjection(), nn.BatchNorm2d(2 * c_out), nn.GLU(dim=1),
                   nn.Conv2d(c_out, 2 * c_out, 3, 1, 1, bias=False), NoiseInjection()]
    layers += [nn.BatchNorm2d(2 * c_out), nn.GLU(dim=1)]
    return nn.Sequential(*layers)


class SkipExcitation(nn.Module):
    """A channel gate in (0, 1) for a fine feature map, computed from a coarse one pooled to 4x4."""

    def __init__(self, c_coarse: int, c_fine: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Conv2d(c_coarse, c_fine, 4, 1, 0, bias=False),
                                  nn.LeakyReLU(0.1), nn.Conv2d(c_fine, c_fine, 1, 1, 0, bias=False), nn.Sigmoid())

    def forward(self, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        return fine * self.gate(coarse)


class Generator(nn.Module):
    """z (and, when conditional, a class) -> image; every level from 32 px on is gated by the level eight
    times coarser."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.nz, self.num_classes = cfg.nz, cfg.num_classes
        self.embed = nn.Embedding(self.num_classes, cfg.nz) if self.num_classes else None
        self.sizes = [2 ** k for k in range(2, int(math.log2(cfg.resolution)) + 1)]
        widths = {s: _width(s, cfg.ngf) for s in self.sizes}
        c4 = widths[4]
        self.initial = nn.Sequential(
            nn.ConvTranspose2d(cfg.nz * (2 if self.num_classes else 1), 2 * c4, 4, 1, 0, bias=False),
            nn.BatchNorm2d(2 * c4), nn.GLU(dim=1))
        self.ups = nn.ModuleDict({str(s): _up_block(widths[s // 2], widths[s], noisy=s <= 32)
                                  for s in self.sizes[1:]})
        self.excite = nn.ModuleDict({str(s): SkipExcitation(widths[s // 8], widths[s])
                                     for s in self.sizes if s >= 32})
        self.to_image = nn.Sequential(nn.Conv2d(widths[self.sizes[-1]], cfg.channels, 3, 1, 1, bias=False), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """`labels` (N,) int64 class indices, required when conditional."""
        z = z.view(z.shape[0], self.nz)
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)
        features = {4: self.initial(z.view(z.shape[0], -1, 1, 1))}
        for s in self.sizes[1:]:
            h = self.ups[str(s)](features[s // 2])
            if str(s) in self.excite:
                h = self.excite[str(s)](features[s // 8], h)
            features[s] = h
        return self.to_image(features[self.sizes[-1]])


class DownBlock(nn.Module):
    """Halves the size: a strided 4x4 + 3x3 convolution path averaged with a pooled 1x1 shortcut."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.main = nn.Sequential(_sn_conv(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                                  nn.LeakyReLU(0.2), _sn_conv(c_out, c_out, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2))
        self.shortcut = nn.Sequential(nn.AvgPool2d(2), _sn_conv(c_in, c_out, 1, 1, 0, bias=False),
                                      nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.main(x) + self.shortcut(x)) / 2


def _decoder(c_in: int, channels: int, ups: int) -> nn.Sequential:
    """Features -> a small image (x2**ups), as cheap as the recipe allows: it only has to make D keep
    enough to draw the slice back."""
    layers: list[nn.Module] = []
    c = c_in
    for _ in range(ups):
        c_next = max(c // 2, 8)
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), _sn_conv(c, 2 * c_next, 3, 1, 1, bias=False),
                   nn.BatchNorm2d(2 * c_next), nn.GLU(dim=1)]
        c = c_next
    layers += [_sn_conv(c, channels, 3, 1, 1, bias=False), nn.Tanh()]
    return nn.Sequential(*layers)


class Discriminator(nn.Module):
    """Image (and, when conditional, a class) -> logit; with `reconstruct=True` also the L1 loss of its
    two decoders on this batch (used on real images only)."""

    self_supervised = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        res = cfg.resolution
        sizes = [2 ** k for k in range(int(math.log2(res)) - 1, 1, -1)]  # res/2 ... 4
        widths = {s: _width(s, cfg.ndf) for s in sizes}
        self.stem = nn.Sequential(_sn_conv(cfg.channels, widths[sizes[0]], 4, 2, 1, bias=False), nn.LeakyReLU(0.2))
        self.downs = nn.ModuleDict({str(s): DownBlock(widths[2 * s], widths[s]) for s in sizes[1:]})
        self.logit = _sn_conv(widths[4], 1, 4, 1, 0, bias=False)
        self.num_classes = cfg.num_classes
        self.project = spectral_norm(nn.Embedding(self.num_classes, widths[4])) if self.num_classes else None
        # The reconstructions are 32x32 whatever the resolution: enough for layout and contrast.
        self.decode_whole = _decoder(widths[8], cfg.channels, ups=2)  # 8x8 features -> 32x32 image
        self.decode_part = _decoder(widths[16], cfg.channels, ups=2)  # a quarter of 16x16 -> 32x32 quarter

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, reconstruct: bool = False):
        """(N,) logits, or (logits, reconstruction loss) with `reconstruct`."""
        h = self.stem(x)
        features = {}
        for s, block in self.downs.items():
            h = block(h)
            features[int(s)] = h
        logits = self.logit(h).flatten()
        if self.project is not None:
            logits = logits + (self.project(labels) * h.sum(dim=(2, 3))).sum(dim=1)
        if not reconstruct:
            return logits
        return logits, self._reconstruction_loss(x, features[8], features[16])

    def _reconstruction_loss(self, x: torch.Tensor, f8: torch.Tensor, f16: torch.Tensor) -> torch.Tensor:
        # The quarter is drawn from the CPU generator: no device sync, and part of the checkpointed RNG.
        quarter = int(torch.randint(4, (1,)))
        row, col = divmod(quarter, 2)
        whole = F.adaptive_avg_pool2d(x, 32)
        half = x.shape[-1] // 2
        part = F.adaptive_avg_pool2d(x[..., row * half:(row + 1) * half, col * half:(col + 1) * half], 32)
        f16_part = f16[..., row * 8:(row + 1) * 8, col * 8:(col + 1) * 8]
        whole_loss = (self.decode_whole(f8).float() - whole.float()).abs().mean()
        part_loss = (self.decode_part(f16_part).float() - part.float()).abs().mean()
        return whole_loss + part_loss


def build(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """Both nets with the recipe's initialisation, which is DCGAN's: convolutions ~ N(0, 0.02), BatchNorm
    scales ~ N(1, 0.02)."""
    generator, discriminator = Generator(cfg), Discriminator(cfg)
    generator.apply(init_weights)
    discriminator.apply(init_weights)
    return generator, discriminator
