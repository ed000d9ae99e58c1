"""Generator output as pictures: reproducible generation and the sample grids a run writes as it trains."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hpcgan.data import pixels


@torch.no_grad()
def generate(generator: torch.nn.Module, z: torch.Tensor, labels: torch.Tensor | None = None, batch: int = 256,
             seed: int = 0, truncation_psi: float = 1.0) -> torch.Tensor:
    """Images from `z` (and, for a conditional generator, class `labels`) in eval mode (BatchNorm running
    stats), in batches; the module's mode is restored. `truncation_psi` < 1 pulls StyleGAN2's styles
    toward their average (its generator's own argument; other archs have none).

    Generators that draw noise of their own (StyleGAN's per-layer noise) draw it from a forked RNG seeded
    with `seed`: samples are reproducible, and sampling never moves the training RNG streams.
    """
    was_training = generator.training
    generator.eval()
    devices = [z.device] if z.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        parts = [(z[i:i + batch], None if labels is None else labels[i:i + batch]) for i in range(0, len(z), batch)]
        extra = {"truncation_psi": truncation_psi} if truncation_psi != 1.0 else {}
        images = torch.cat([generator(zs, ys, **extra).float() if ys is not None else generator(zs, **extra).float()
                            for zs, ys in parts])
    generator.train(was_training)
    return images


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W) or (N, H, W, C) uint8."""
    arr = pixels.to_uint8(images).permute(0, 2, 3, 1).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def grid_columns(n: int) -> int:
    return math.ceil(math.sqrt(n))


def grid_labels(n: int, num_classes: int) -> torch.Tensor:
    """Labels for an `n`-image grid that shows every class: row r holds class r mod `num_classes`, or,
    with more classes than rows, tile i holds class i mod `num_classes`."""
    cols = grid_columns(n)
    index = torch.arange(n)
    return (index // cols if num_classes <= math.ceil(n / cols) else index) % num_classes


def save_grid(images: torch.Tensor, path: Path, pad: int = 2) -> Path:
    tiles = to_uint8(images)
    n, h, w = tiles.shape[:3]
    cols = grid_columns(n)
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad) + tiles.shape[3:], dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = tile
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    try:
        Image.fromarray(grid).save(tmp)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
