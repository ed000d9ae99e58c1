"""Load a folder of slice images or a uint8 tensor file into one (N, C, H, W) uint8 tensor."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from hpcgan.data.reader import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def load_image_folder(folder: Path) -> torch.Tensor:
    """Every image under `folder` (recursive, sorted, converted to grayscale), all of one size."""
    files = _files(folder)
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        log.warning("ignoring %d non-image file(s) in %s, e.g. %s", len(others), folder, others[0])
    if not images:
        raise DataError(f"{folder}: no images found (PNG/JPG/TIFF, searched recursively); "
                        "point --data at a folder of slices or a prepared shard folder")
    arrays = []
    for path in images:
        try:
            with Image.open(path) as img:
                arr = np.asarray(img.convert("L"))
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise DataError(f"{path}: cannot decode image ({err}); remove or replace the file") from None
        if arrays and arr.shape != arrays[0].shape:
            raise DataError(f"{path}: size {arr.shape[1]}x{arr.shape[0]} differs from "
                            f"{arrays[0].shape[1]}x{arrays[0].shape[0]} of {images[0]}; "
                            "resize all slices to one size (hpcgan prepare --size N does)")
        arrays.append(arr)
    return torch.from_numpy(np.stack(arrays)).unsqueeze(1)


def load_tensor_file(path: Path) -> torch.Tensor:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise DataError(f"{path}: not a readable tensor file ({type(err).__name__}); "
                        "save a uint8 tensor with torch.save(t, path)") from None
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() not in (3, 4):
        raise DataError(f"{path}: expected a uint8 tensor of shape (N, H, W) or (N, C, H, W)")
    if data.shape[0] == 0:
        raise DataError(f"{path}: the tensor holds no images")
    return data.unsqueeze(1) if data.dim() == 3 else data


def folder_labels(path: str | Path) -> tuple[torch.Tensor | None, tuple[str, ...]]:
    """Labels of `load_images(path)` by the ImageFolder convention (the first folder level under `path`
    is the class, names sorted): (int64 (N,), classes) when every image lies in a subfolder, else
    (None, ()), as for a tensor file."""
    path = Path(path)
    if not path.is_dir():
        return None, ()
    parts = [p.relative_to(path).parts for p in _files(path) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not parts or any(len(x) < 2 for x in parts):
        return None, ()
    classes = tuple(sorted({x[0] for x in parts}))
    index = {name: i for i, name in enumerate(classes)}
    return torch.tensor([index[x[0]] for x in parts], dtype=torch.int64), classes


def load_images(path: str | Path) -> torch.Tensor:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data path does not exist; pass --data FOLDER_OR_FILE")
    if path.is_dir():
        return load_image_folder(path)
    return load_tensor_file(path)
