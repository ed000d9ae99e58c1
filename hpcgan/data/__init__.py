"""Data in: one `Reader` interface, readers chosen by `data.reader`.

`data.path` is an image folder or a uint8 tensor file (memory reader only), or a shard folder written by
`hpcgan prepare` (a folder with manifest.json), which any reader can serve. Readers return each image
with its class: from a labelled shard folder, or from the subfolders of an image folder (ImageFolder).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from hpcgan.config import DataConfig
from hpcgan.data import shards
from hpcgan.data.images import folder_labels, load_images
from hpcgan.data.memory import MemoryReader
from hpcgan.data.reader import Batch, Reader, DataError

__all__ = ["SHARD_READERS", "Batch", "Reader", "DataError", "build_reader", "choose_reader", "dali_available",
           "load_images",
           "load_labelled", "load_split"]

log = logging.getLogger(__name__)

MEMORY_LIMIT_BYTES = 2 * 1024**3  # `auto` keeps a decoded train set below this in memory
_said_no_dali = False


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def choose_reader(split: shards.Split) -> str:
    """`data.reader=auto`: memory when the decoded set is small, else DALI if installed, else webdataset."""
    global _said_no_dali
    if split.num_images * split.size * split.size < MEMORY_LIMIT_BYTES:
        return "memory"
    if dali_available():
        return "dali"
    if not _said_no_dali:
        log.warning("data.reader=auto: NVIDIA DALI is not installed (pip install 'hpcgan[dali]', Linux); "
                    "using the webdataset reader")
        _said_no_dali = True
    return "webdataset"


def load_split(shard_dir: str | Path, split: str = "val", size: int | None = None,
               workers: int = 2) -> torch.Tensor:
    """A split of a shard folder as uint8 (N, 1, H, W), in shard order; N may be 0 (e.g. no val subjects).

    `size` picks the resolution when the shards hold several (default: the first in the manifest).
    """
    return load_labelled(shard_dir, split, size, workers)[0]


def load_labelled(shard_dir: str | Path, split: str = "val", size: int | None = None,
                  workers: int = 2) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """`load_split` with each image's class: (uint8 (N, 1, H, W), int64 (N,) labels, class names); labels
    are all 0 and the names () when the shards have no classes."""
    opened = shards.open_split(Path(shard_dir), split, size)
    images = torch.from_numpy(shards.decode_split(opened, workers)).unsqueeze(1)
    return images, torch.from_numpy(opened.labels), opened.classes


def load_real(path: str | Path, split: str = "val", size: int | None = None) -> torch.Tensor:
    """Real slices for metrics as uint8 (N, 1, H, W): a shard folder's split (the train split when
    `split` is empty, e.g. no held-out subjects), or all images of a folder / tensor file."""
    if shards.is_shard_dir(Path(path)):
        images = load_split(path, split, size)
        if len(images) == 0 and split != "train":
            log.warning("%s has no %s images; measuring against the train split instead", path, split)
            images = load_split(path, "train", size)
        return images
    return load_images(path)


def _memory(split: shards.Split, cfg: DataConfig, common: dict) -> Reader:
    images = torch.from_numpy(shards.decode_split(split, cfg.workers)).unsqueeze(1)
    return MemoryReader(images, device_resident=cfg.device_resident, labels=torch.from_numpy(split.labels),
                        classes=split.classes, **common)


def _webdataset(split: shards.Split, cfg: DataConfig, common: dict) -> Reader:
    from hpcgan.data.webdataset_reader import WebDatasetReader

    return WebDatasetReader(split, workers=cfg.workers, **common)


def _dali(split: shards.Split, cfg: DataConfig, common: dict) -> Reader:
    if not dali_available():
        raise DataError("data.reader=dali, but NVIDIA DALI is not installed: pip install 'hpcgan[dali]' "
                        "(Linux), or set data.reader=webdataset")
    from hpcgan.data.dali_reader import DaliReader

    return DaliReader(split, workers=cfg.workers, **common)


# The readers of a shard folder by `data.reader`; an image folder or tensor file is read by `memory` only.
SHARD_READERS = {"memory": _memory, "webdataset": _webdataset, "dali": _dali}


def build_reader(cfg: DataConfig, *, seed: int, global_batch: int, rank: int, world: int,
                 device: torch.device, resolution: int | None = None) -> Reader:
    """The reader for `cfg` serving this rank's share of each global batch.

    `resolution` (the model's) picks the image size in a shard folder that holds several and is checked
    against image folders; None takes a shard folder's first size.
    """
    if not cfg.path:
        raise DataError("no data given: pass --data FOLDER (images), FILE (.pt uint8 tensor) or SHARD_DIR")
    path = Path(cfg.path)
    common = dict(seed=seed, global_batch=global_batch, rank=rank, world=world, device=device, flip=cfg.flip)
    if shards.is_shard_dir(path):
        split = shards.open_split(path, "train", resolution)
        reader = choose_reader(split) if cfg.reader == "auto" else cfg.reader
        log.info("data: %s (%d train images, %dx%d) via the %s reader", path, split.num_images, split.size,
                 split.size, reader)
        return SHARD_READERS[reader](split, cfg, common)
    if cfg.reader not in ("auto", "memory"):
        raise DataError(f"data.reader={cfg.reader!r} needs prepared shards (hpcgan prepare); {path} is not one")
    images = load_images(path)
    if resolution is not None and tuple(images.shape[-2:]) != (resolution, resolution):
        raise DataError(f"{path}: images are {images.shape[-1]}x{images.shape[-2]}, the model needs "
                        f"{resolution}x{resolution}: set model.resolution={images.shape[-1]} or run "
                        f"hpcgan prepare {path} --out SHARD_DIR --size {resolution}")
    labels, classes = folder_labels(path)
    return MemoryReader(images, device_resident=cfg.device_resident, labels=labels, classes=classes, **common)
