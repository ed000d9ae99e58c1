"""StyleGAN2 (Karras et al. 2020) in plain PyTorch: the model class that wins on scarce medical data.

G: a mapping network turns z into a style w; a learned 4x4 constant is refined resolution by
resolution by modulated/demodulated 3x3 convolutions with per-layer noise; every resolution adds its
own RGB (here gray) image to an upsampled sum (the skip architecture). D: residual blocks down to 4x4,
minibatch standard deviation, two dense layers, one logit. Equalised learning rate everywhere (weights
stored N(0, 1), scaled at run time), so Adam's per-parameter steps are comparable across layers.

Choices made for portability: modulation is applied to activations ("non-fused"), which is an ordinary
conv2d and fast on CPUs and GPUs alike; up- and down-sampling are bilinear and average pooling, which
need no custom kernels. Widths come from `channel_base` and `channel_max`, so one class is the small CPU
model and the full GPU one. Noise inputs draw from the global RNG: checkpoints restore it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hpcgan.config import ModelConfig

GAIN = math.sqrt(2)  # LeakyReLU(0.2) gain: keeps activations' scale through the layers


def widths(cfg: ModelConfig) -> dict[int, int]:
    """Feature maps per resolution, 4 .. cfg.resolution."""
    levels = int(math.log2(cfg.resolution))
    return {2 ** i: min(cfg.channel_base // 2 ** i, cfg.channel_max) for i in range(2, levels + 1)}


class Dense(nn.Module):
    """A fully connected layer with equalised learning rate and an optional learning-rate multiplier."""

    def __init__(self, c_in: int, c_out: int, *, bias_init: float = 0.0, lr_mul: float = 1.0, act: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in) / lr_mul)
        self.bias = nn.Parameter(torch.full((c_out,), bias_init / lr_mul))
        self.scale, self.lr_mul, self.act = lr_mul / math.sqrt(c_in), lr_mul, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return F.leaky_relu(x, 0.2) * GAIN if self.act else x


class Conv(nn.Module):
    """A convolution with equalised learning rate, for D."""

    def __init__(self, c_in: int, c_out: int, k: int, *, bias: bool = True, act: bool = True, down: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.scale, self.act, self.down, self.pad = 1 / math.sqrt(c_in * k * k), act, down, k // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight * self.scale, self.bias, padding=self.pad)
        if self.down:
            x = F.avg_pool2d(x, 2)
        return F.leaky_relu(x, 0.2) * GAIN if self.act else x


class Mapping(nn.Module):
    """z -> w; tracks the average w, the centre that truncation pulls styles towards."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dims = [cfg.nz] + [cfg.w_dim] * cfg.mapping_layers
        self.layers = nn.Sequential(*[Dense(a, b, lr_mul=0.01, act=True) for a, b in zip(dims, dims[1:])])
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        w = self.layers(z)
        if self.training:
            with torch.no_grad():
                self.w_avg.lerp_(w.detach().float().mean(dim=0), 0.005)
        return w


class ModulatedConv(nn.Module):
    """A 3x3 (or 1x1) convolution whose input channels are scaled by a per-sample style, and whose output
    is demodulated back to unit variance (StyleGAN2's replacement of AdaIN)."""

    def __init__(self, c_in: int, c_out: int, w_dim: int, k: int = 3, demodulate: bool = True) -> None:
        super().__init__()
        self.affine = Dense(w_dim, c_in, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k))
        self.scale, self.demodulate, self.pad = 1 / math.sqrt(c_in * k * k), demodulate, k // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w)
        weight = self.weight * self.scale
        x = F.conv2d(x * styles.to(x.dtype).view(*styles.shape, 1, 1), weight.to(x.dtype), padding=self.pad)
        if self.demodulate:
            # ||w_oi * s_i||: computed in fp32 whatever autocast runs the convolution in.
            sigma = torch.einsum("oi,ni->no", weight.float().square().sum(dim=(2, 3)), styles.float().square())
            x = x * (sigma + 1e-8).rsqrt().to(x.dtype).view(*sigma.shape, 1, 1)
        return x


class SynthesisLayer(nn.Module):
    def __init__(self, c_in: int, c_out: int, w_dim: int, up: bool = False) -> None:
        super().__init__()
        self.conv = ModulatedConv(c_in, c_out, w_dim)
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.up = up

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.conv(x, w)
        noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
        x = x + noise * self.noise_strength + self.bias.view(1, -1, 1, 1).to(x.dtype)
        return F.leaky_relu(x, 0.2) * GAIN


class ToGray(nn.Module):
    def __init__(self, c_in: int, channels: int, w_dim: int) -> None:
        super().__init__()
        self.conv = ModulatedConv(c_in, channels, w_dim, k=1, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.conv(x, w) + self.bias.view(1, -1, 1, 1).to(x.dtype)


class Generator(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.nz, self.style_mixing = cfg.nz, cfg.style_mixing
        ch = widths(cfg)
        self.mapping = Mapping(cfg)
        self.const = nn.Parameter(torch.randn(ch[4], 4, 4))
        self.layers = nn.ModuleList([SynthesisLayer(ch[4], ch[4], cfg.w_dim)])
        self.to_gray = nn.ModuleList([ToGray(ch[4], cfg.channels, cfg.w_dim)])
        for res in list(ch)[1:]:
            self.layers.extend([SynthesisLayer(ch[res // 2], ch[res], cfg.w_dim, up=True),
                                SynthesisLayer(ch[res], ch[res], cfg.w_dim)])
            self.to_gray.append(ToGray(ch[res], cfg.channels, cfg.w_dim))

    @property
    def num_styles(self) -> int:
        """Style inputs: one per synthesis layer plus the last ToGray."""
        return len(self.layers) + 1

    def styles(self, z: torch.Tensor, truncation_psi: float = 1.0) -> torch.Tensor:
        """(N, num_styles, w_dim): one w per layer, mixed from a second latent after a random layer
        with probability `style_mixing` in training (it keeps neighbouring layers' styles independent)."""
        w = self.mapping(z)
        if truncation_psi != 1.0:
            w = self.mapping.w_avg.to(w.dtype).lerp(w, truncation_psi)
        ws = w.unsqueeze(1).repeat(1, self.num_styles, 1)
        if self.training and self.style_mixing > 0:
            cutoff = torch.randint(1, self.num_styles, (), device=z.device)
            mix = torch.rand((), device=z.device) < self.style_mixing
            cutoff = torch.where(mix, cutoff, torch.full_like(cutoff, self.num_styles))
            w2 = self.mapping(torch.randn_like(z))
            after = (torch.arange(self.num_styles, device=z.device) >= cutoff).view(1, -1, 1)
            ws = torch.where(after, w2.unsqueeze(1), ws)
        return ws

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0) -> torch.Tensor:
        ws = self.styles(z, truncation_psi)
        x = self.const.to(ws.dtype).unsqueeze(0).expand(z.shape[0], -1, -1, -1)
        x = self.layers[0](x, ws[:, 0])
        image = self.to_gray[0](x, ws[:, 1])
        for i, to_gray in enumerate(self.to_gray[1:]):
            x = self.layers[1 + 2 * i](x, ws[:, 1 + 2 * i])
            x = self.layers[2 + 2 * i](x, ws[:, 2 + 2 * i])
            image = F.interpolate(image, scale_factor=2, mode="bilinear", align_corners=False) + to_gray(x, ws[:, 3 + 2 * i])
        return image


class DBlock(nn.Module):
    """Two convolutions, the second halving the size, beside a 1x1 skip; summed at unit variance."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv0 = Conv(c_in, c_in, 3)
        self.conv1 = Conv(c_in, c_out, 3, down=True)
        self.skip = Conv(c_in, c_out, 1, bias=False, act=False, down=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.skip(x) + self.conv1(self.conv0(x))) / math.sqrt(2)


def minibatch_stddev(x: torch.Tensor, group: int = 4) -> torch.Tensor:
    """One extra channel: the standard deviation across a group of samples, so D can see a batch that
    lacks variety (mode collapse). The group is the largest size <= `group` that divides the batch."""
    n, c, h, w = x.shape
    g = max(d for d in range(1, min(group, n) + 1) if n % d == 0)
    y = x.float().reshape(g, n // g, c, h, w)
    y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (n // g,)
    y = y.repeat(g).view(n, 1, 1, 1).expand(n, 1, h, w).to(x.dtype)
    return torch.cat([x, y], dim=1)


class Discriminator(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        ch = widths(cfg)
        resolutions = sorted(ch, reverse=True)  # R .. 4
        self.from_gray = Conv(cfg.channels, ch[resolutions[0]], 1)
        self.blocks = nn.Sequential(*[DBlock(ch[r], ch[r // 2]) for r in resolutions[:-1]])
        self.conv = Conv(ch[4] + 1, ch[4], 3)
        self.dense = Dense(ch[4] * 16, ch[4], act=True)
        self.out = Dense(ch[4], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.from_gray(x))
        x = self.conv(minibatch_stddev(x))
        return self.out(self.dense(x.flatten(1))).flatten()


def build(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    return Generator(cfg), Discriminator(cfg)
