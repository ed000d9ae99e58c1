"""The one conversion between stored pixels (uint8, 0..255) and what networks see (float, -1..1)."""

from __future__ import annotations

import torch


def to_unit(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 0..255 -> float -1..1."""
    return images.to(dtype).div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float -1..1 (clamped) -> uint8 0..255, on the CPU."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
