"""Differentiable augmentations of grayscale MRI slices in [-1, 1], each applied per image with probability p.

Geometric ops compose into one affine matrix per image and cost one bilinear `grid_sample` however many
are on. The sampling grid is built in pixel units rather than by `F.affine_grid`, whose normalised grid
misses the pixel centres (by 2e-6 px at 64 px, 8e-6 at 256): so flips, quarter turns, integer shifts
and images no op touched come through bit-exact (power-of-two sizes). Everything that pads or fills uses
-1, the black background of skull-stripped slices, so a filled border or hole looks like the background
and not like a new structure G could learn to draw. Every op draws the same numbers whether or not it
fires, so the random stream depends only on the ops listed and the batch size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GEOMETRIC = ("flip", "rot90", "translate", "scale", "rotate", "aniso")
ALL_OPS = (*GEOMETRIC, "cutout", "brightness", "contrast")  # also the order they are applied in

BLACK = -1.0
TRANSLATE_MAX = 1 / 8  # of the image size, in whole pixels
SCALE_STD = 0.2 * math.log(2)  # log-normal isotropic and anisotropic scaling (ADA)
# Slices come from head-aligned volumes: orientation carries anatomy (anterior up), and real head tilt in
# the scanner is a few degrees. Small rotations cover that pose variation; ADA's arbitrary angles would
# spend D's capacity on rotation invariance and could leak tilted brains into G at high p.
ROTATE_STD = math.radians(10)
BRIGHTNESS_STD = 0.2  # added, in [-1, 1] units (ADA)
CONTRAST_STD = 0.5 * math.log(2)  # log-normal factor around the image mean (ADA)
CUTOUT_SIZE = 0.5  # side of the black square, as a fraction of the image size


def check_ops(ops: list[str]) -> None:
    unknown = [op for op in ops if op not in ALL_OPS]
    if unknown:
        raise ValueError(f"augment.ops: unknown {', '.join(map(repr, unknown))}; allowed: {', '.join(ALL_OPS)}")


def _fires(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=gen.device) < p


def _compose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched `a @ b` of 3x3 matrices, elementwise: exact for 0/±1 entries and untouched by autocast or
    TF32, which would round a matmul's inputs."""
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)


def geometric_matrix(ops: list[str], p: float, n: int, height: int, width: int,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(n, 3, 3) matrices mapping output to input pixel coordinates (origin at the image centre), and which
    images any op fired in; None when no geometric op is listed. Images an op skips get its identity."""
    listed = [op for op in GEOMETRIC if op in ops]
    if not listed:
        return None
    device = gen.device
    eye = torch.eye(3, device=device).expand(n, 3, 3)
    matrix, fired = eye, torch.zeros(n, dtype=torch.bool, device=device)
    for op in listed:
        mask = _fires(n, p, gen)
        fired = fired | mask
        m = eye.clone()
        if op == "flip":
            m[:, 0, 0] = torch.where(mask, -1.0, 1.0)
        elif op in ("rot90", "rotate"):
            if op == "rot90":  # quarter turns; rounding makes cos and sin exactly 0 or ±1
                angle = torch.randint(0, 4, (n,), generator=gen, device=device) * (math.pi / 2)
                cos, sin = angle.cos().round(), angle.sin().round()
            else:
                angle = torch.randn(n, generator=gen, device=device) * ROTATE_STD
                cos, sin = angle.cos(), angle.sin()
            m[:, 0, 0], m[:, 0, 1] = torch.where(mask, cos, 1.0), torch.where(mask, -sin, 0.0)
            m[:, 1, 0], m[:, 1, 1] = torch.where(mask, sin, 0.0), torch.where(mask, cos, 1.0)
        elif op == "translate":
            for axis, size in ((0, width), (1, height)):
                reach = int(size * TRANSLATE_MAX)
                shift = torch.randint(-reach, reach + 1, (n,), generator=gen, device=device)
                m[:, axis, 2] = torch.where(mask, shift.float(), 0.0)
        else:
            s = torch.where(mask, (torch.randn(n, generator=gen, device=device) * SCALE_STD).exp(), 1.0)
            m[:, 0, 0], m[:, 1, 1] = s, (s if op == "scale" else 1 / s)
        matrix = _compose(matrix, m)
    return matrix, fired


def warp(images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Resample float32 `images` through `matrix` (bilinear, differentiable); outside the image is black.

    Sampling with zero padding leaves each output pixel short by (1 - coverage) of black, where coverage is
    the bilinear weight that fell inside the image: 1 in the interior, so interior pixels are untouched."""
    n, _, h, w = images.shape
    u = torch.arange(w, device=images.device, dtype=torch.float32) - (w - 1) / 2
    v = torch.arange(h, device=images.device, dtype=torch.float32).view(h, 1) - (h - 1) / 2
    m = matrix[:, :2].reshape(n, 2, 3, 1, 1)
    source = m[:, :, 0] * u + m[:, :, 1] * v + m[:, :, 2]  # (n, 2, h, w)
    ix, iy = source[:, 0] + (w - 1) / 2, source[:, 1] + (h - 1) / 2
    grid = torch.stack(((2 * ix + 1) / w - 1, (2 * iy + 1) / h - 1), dim=-1)
    coverage = torch.minimum(ix + 1, w - ix).clamp(0, 1) * torch.minimum(iy + 1, h - iy).clamp(0, 1)
    sampled = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled + BLACK * (1 - coverage.unsqueeze(1))


def cutout(images: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """A black square of CUTOUT_SIZE at a uniformly random centre (it may overhang the border)."""
    n, _, h, w = images.shape
    mask = _fires(n, p, gen)
    centre = torch.rand(n, 2, 1, 1, generator=gen, device=gen.device)
    ys = ((torch.arange(h, device=images.device) + 0.5) / h).view(h, 1)
    xs = (torch.arange(w, device=images.device) + 0.5) / w
    inside = ((ys - centre[:, 0]).abs() < CUTOUT_SIZE / 2) & ((xs - centre[:, 1]).abs() < CUTOUT_SIZE / 2)
    return torch.where((inside & mask.view(n, 1, 1)).unsqueeze(1), BLACK, images)


def brightness(images: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    n = images.shape[0]
    mask = _fires(n, p, gen)
    shift = torch.randn(n, generator=gen, device=gen.device) * BRIGHTNESS_STD
    return images + torch.where(mask, shift, 0.0).view(n, 1, 1, 1)


def contrast(images: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    n = images.shape[0]
    mask = _fires(n, p, gen)
    factor = (torch.randn(n, generator=gen, device=gen.device) * CONTRAST_STD).exp()
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return images + (images - mean) * (torch.where(mask, factor, 1.0) - 1).view(n, 1, 1, 1)  # exact where skipped


PIXEL_OPS = {"cutout": cutout, "brightness": brightness, "contrast": contrast}  # after the warp, in this order
