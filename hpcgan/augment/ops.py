"""Differentiable augmentations of grayscale MRI slices in [-1, 1], each applied per image with probability p.

Geometric ops compose into one affine matrix per image, applied by one `grid_sample`, so a batch costs
one resampling however many ops are on. Everything that pads or fills uses -1, the black background of
skull-stripped or defaced slices: a grey border would tell D which images were augmented.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GEOMETRIC = ("flip", "rot90", "translate", "scale", "rotate", "aniso")
INTENSITY = ("brightness", "contrast")
ALL_OPS = (*GEOMETRIC, *INTENSITY, "cutout")

SCALE_STD = 0.2 * math.log(2)  # log-normal isotropic and anisotropic scaling, as ADA
ROTATE_STD = math.radians(10)  # brains are roughly aligned: small rotations, not arbitrary ones
TRANSLATE_MAX = 0.125  # of the image size
BRIGHTNESS_STD = 0.2
CONTRAST_STD = 0.5 * math.log(2)


def check_ops(ops: list[str]) -> None:
    unknown = sorted(set(ops) - set(ALL_OPS))
    if unknown:
        raise ValueError(f"augment.ops: unknown {', '.join(unknown)}; choose from {', '.join(ALL_OPS)}")


def _apply(mask: torch.Tensor, values: torch.Tensor, neutral: float) -> torch.Tensor:
    """Per-image parameter: `values` where the op fires, the neutral value elsewhere."""
    return torch.where(mask, values, torch.full_like(values, neutral))


def geometric_matrix(ops: list[str], p: float, n: int, size: int, gen: torch.Generator,
                     device: torch.device) -> torch.Tensor | None:
    """(n, 2, 3) affine matrices in normalised coordinates (output -> input), or None when there is
    nothing to resample. Images an op skips get its identity; on a GPU the batch is resampled whether or
    not any op fired (finding out would be a host sync), on the CPU a batch no op touched is skipped."""
    def fires() -> torch.Tensor:
        return torch.rand(n, generator=gen, device=device) < p

    def normal() -> torch.Tensor:
        return torch.randn(n, generator=gen, device=device)

    geometric = [o for o in ops if o in GEOMETRIC]
    if not geometric:
        return None
    eye = torch.eye(3, device=device).expand(n, 3, 3).clone()
    matrix, fired = eye, torch.zeros(n, dtype=torch.bool, device=device)
    for op in geometric:
        mask = fires()
        fired |= mask
        m = eye.clone()
        if op == "flip":
            m[:, 0, 0] = _apply(mask, -torch.ones(n, device=device), 1.0)
        elif op == "rot90":
            k = torch.randint(0, 4, (n,), generator=gen, device=device).float() * (math.pi / 2)
            angle = _apply(mask, k, 0.0)
            m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
        elif op == "translate":
            # Whole pixels: in normalised coordinates one pixel is 2/size.
            shift = torch.rand(n, 2, generator=gen, device=device) * 2 - 1
            pixels = (shift * TRANSLATE_MAX * size).round()
            m[:, 0, 2] = _apply(mask, pixels[:, 0] * 2 / size, 0.0)
            m[:, 1, 2] = _apply(mask, pixels[:, 1] * 2 / size, 0.0)
        elif op == "scale":
            s = _apply(mask, (normal() * SCALE_STD).exp(), 1.0)
            m[:, 0, 0], m[:, 1, 1] = s, s
        elif op == "rotate":
            angle = _apply(mask, normal() * ROTATE_STD, 0.0)
            m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
        elif op == "aniso":
            s = _apply(mask, (normal() * SCALE_STD).exp(), 1.0)
            m[:, 0, 0], m[:, 1, 1] = s, 1 / s
        matrix = matrix @ m
    if device.type == "cpu" and not fired.any():
        return None
    return matrix[:, :2, :]


def resample(images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Warp by `matrix`, filling outside the image with black (-1); bilinear, differentiable."""
    grid = F.affine_grid(matrix, list(images.shape), align_corners=False)
    return F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


def intensity(images: torch.Tensor, ops: list[str], p: float, gen: torch.Generator) -> torch.Tensor:
    n, device = images.shape[0], images.device
    for op in (o for o in ops if o in INTENSITY):
        mask = torch.rand(n, generator=gen, device=device) < p
        noise = torch.randn(n, generator=gen, device=device)
        if op == "brightness":
            images = images + _apply(mask, noise * BRIGHTNESS_STD, 0.0).view(-1, 1, 1, 1)
        else:
            mean = images.mean(dim=(1, 2, 3), keepdim=True)
            images = (images - mean) * _apply(mask, (noise * CONTRAST_STD).exp(), 1.0).view(-1, 1, 1, 1) + mean
    return images


def cutout(images: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """A square of half the image size at a random centre, set to black, in images where it fires."""
    n, _, h, w = images.shape
    device = images.device
    mask = torch.rand(n, generator=gen, device=device) < p
    centre = torch.rand(n, 2, generator=gen, device=device)
    ys = (torch.arange(h, device=device) + 0.5) / h
    xs = (torch.arange(w, device=device) + 0.5) / w
    inside = ((ys.view(1, h, 1) - centre[:, 0].view(n, 1, 1)).abs() < 0.25) & \
             ((xs.view(1, 1, w) - centre[:, 1].view(n, 1, 1)).abs() < 0.25) & mask.view(n, 1, 1)
    return torch.where(inside.unsqueeze(1), torch.full_like(images, -1.0), images)
