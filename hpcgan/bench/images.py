"""One image set in the two forms the loops read, so that hpcgan and the reference train on the same files.

hpcgan reads a shard folder (any reader) or an image folder (memory reader); the reference reads an
ImageFolder root, `ROOT/<class>/<image>`. From shards, the reference's folder receives the very PNG
bytes of the train split; an image folder is linked in as the one class. Without --data, the
quickstart MNI152 slices (shipped with nilearn) are prepared at each benchmarked resolution.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from hpcgan.data import load_images, shards
from hpcgan.data.reader import DataError


@dataclass(frozen=True)
class BenchImages:
    path: Path  # hpcgan's data.path
    reference_root: Path  # the reference's ImageFolder root
    resolution: int
    count: int
    shards: bool  # streaming readers (webdataset, DALI) need shards
    origin: str


def bench_images(data: str | None, resolution: int, workdir: Path) -> BenchImages:
    if data is None:
        from hpcgan.data.quickstart import quickstart_shards

        shard_dir = quickstart_shards(workdir / f"quickstart-{resolution}", size=resolution)
        return _from_shards(shard_dir, resolution, workdir, "quickstart MNI152 slices (nilearn), train split")
    path = Path(data)
    if shards.is_shard_dir(path):
        return _from_shards(path, resolution, workdir, f"{path}, train split")
    if not path.is_dir():
        raise DataError(f"{path}: --data must be an image folder or a shard folder written by hpcgan prepare")
    images = load_images(path)
    if tuple(images.shape[-2:]) != (resolution, resolution):
        raise DataError(f"{path}: images are {images.shape[-1]}x{images.shape[-2]}, not {resolution}x{resolution}; "
                        f"pass --resolutions {images.shape[-1]} or prepare shards at that size")
    root = _fresh(workdir / f"reference-{resolution}")
    (root / "images").symlink_to(path.resolve(), target_is_directory=True)
    return BenchImages(path, root, resolution, images.shape[0], False, str(path))


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _from_shards(shard_dir: Path, resolution: int, workdir: Path, origin: str) -> BenchImages:
    split = shards.open_split(shard_dir, "train", resolution)
    if split.num_images == 0:
        raise DataError(f"{shard_dir}: the train split holds no images")
    folder = _fresh(workdir / f"reference-{resolution}") / "mri"
    folder.mkdir()
    blobs = [tar.read_bytes() for tar in split.tars]
    for row, (number, offset, length) in enumerate(split.refs.tolist()):
        (folder / f"{row:06d}.png").write_bytes(blobs[number][offset:offset + length])
    return BenchImages(shard_dir, folder.parent, resolution, split.num_images, True, origin)
