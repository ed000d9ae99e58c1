"""SSIM, MS-SSIM (Wang et al. 2003) and the MS-SSIM diversity score used as a mode-collapse alarm.

Gaussian window 11, sigma 1.5, K1=0.01, K2=0.03, "valid" filtering and 2x2 average pooling between
scales, as in the reference implementation. Images in [-1, 1] are mapped to [0, 1] (data range 1)
first: the luminance term assumes non-negative intensities and goes negative for means of opposite
sign. The standard
5 scales need images of at least 11 * 2**4 = 176 px; smaller images use as many scales as still fit
the window (64 px: 3, 32 px: 2) with the first weights renormalised to sum to 1. Negative contrast
terms are clipped to 0 (as TensorFlow does) so fractional powers stay real.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpcgan.metrics.registry import MetricContext, Result, register

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
WINDOW, SIGMA = 11, 1.5


def _window(device: torch.device) -> torch.Tensor:
    x = torch.arange(WINDOW, dtype=torch.float32, device=device) - WINDOW // 2
    g = torch.exp(-x ** 2 / (2 * SIGMA ** 2))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, WINDOW), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, WINDOW, 1), groups=c)


def _ssim_terms(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean of the full SSIM map and of its contrast-structure part, for [0, 1] images."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_x, mu_y, xx, yy, xy = _filter(torch.cat([x, y, x * x, y * y, x * y], dim=1), _window(x.device)).chunk(5, 1)
    var_x, var_y, cov = xx - mu_x ** 2, yy - mu_y ** 2, xy - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    lum = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1)
    return (lum * cs).flatten(1).mean(1), cs.flatten(1).mean(1)


def _unit(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked and mapped from [-1, 1] to [0, 1]."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two (N, C, H, W) batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW}x{WINDOW}, got {tuple(x.shape[-2:])}")
    return (x.float() + 1) * 0.5, (y.float() + 1) * 0.5


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) SSIM of corresponding images in [-1, 1]."""
    return _ssim_terms(*_unit(x, y))[0]


def ms_ssim_scales(size: int) -> int:
    """How many of the 5 standard scales fit an image of side `size` with the 11-px window."""
    scales = 0
    while scales < len(MS_SSIM_WEIGHTS) and size >= WINDOW:
        scales += 1
        size //= 2
    return scales


def ms_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) MS-SSIM of corresponding images in [-1, 1]."""
    x, y = _unit(x, y)
    scales = ms_ssim_scales(min(x.shape[-2:]))
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], device=x.device)
    weights = weights / weights.sum()
    factors = []
    for scale in range(scales):
        full, cs = _ssim_terms(x, y)
        # Both terms lie in [0, 1] in exact arithmetic (negatives: anti-correlated, treated as 0); rounding
        # would push identical images (a collapsed G) just above 1.
        factors.append((full if scale == scales - 1 else cs).clamp(0, 1))
        if scale < scales - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return torch.stack(factors, dim=1).pow(weights).prod(dim=1)


def ms_ssim_diversity(images: torch.Tensor, *, pairs: int = 1000, seed: int = 0, batch: int = 250) -> float:
    """Mean MS-SSIM over random pairs of distinct images: higher = more alike = less diverse."""
    n = len(images)
    if n < 2:
        raise ValueError("MS-SSIM diversity needs at least 2 images")
    gen = torch.Generator().manual_seed(seed)
    i = torch.randint(0, n, (pairs,), generator=gen)
    j = (i + torch.randint(1, n, (pairs,), generator=gen)) % n  # uniform over j != i
    i, j = i.to(images.device), j.to(images.device)
    total = sum(ms_ssim(images[i[s:s + batch]], images[j[s:s + batch]]).sum() for s in range(0, pairs, batch))
    return float(total) / pairs


@register("msssim")
def _msssim(ctx: MetricContext) -> Result:
    return {"msssim": ms_ssim_diversity(ctx.fake, seed=ctx.seed),
            "msssim_real": ms_ssim_diversity(ctx.real, seed=ctx.seed)}
