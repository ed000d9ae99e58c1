"""Data in: one `BatchSource` interface, readers chosen by `data.reader`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from hpcgan.config import DataConfig
from hpcgan.data.images import load_images
from hpcgan.data.memory import MemorySource
from hpcgan.data.source import BatchSource, DataError

__all__ = ["BatchSource", "DataError", "build_source", "load_images"]

log = logging.getLogger(__name__)


def build_source(cfg: DataConfig, *, seed: int, global_batch: int, rank: int, world: int,
                 device: torch.device) -> BatchSource:
    path = Path(cfg.path)
    if not cfg.path:
        raise DataError("no data given: pass --data FOLDER (images), FILE (.pt uint8 tensor) or SHARD_DIR")
    if cfg.reader not in ("auto", "memory"):
        raise DataError(f"data.reader={cfg.reader!r} needs prepared shards (hpcgan prepare); {path} is not one")
    images = load_images(path)
    return MemorySource(images, seed=seed, global_batch=global_batch, rank=rank, world=world,
                        device=device, flip=cfg.flip, device_resident=cfg.device_resident)
