"""The on-disk shard layout: WebDataset tars, their DALI index files, and manifest.json.

A shard folder holds `train-000000.tar`, `val-000000.tar`, ... each with an index file beside it
(`train-000000.idx`, DALI's wds2idx v1.2 format), and `manifest.json`. A sample is one tar member per
resolution, `<key>.<size>.png`, plus `<key>.json`, and in a labelled folder (the manifest lists
`classes`) `<key>.cls`: the class index as decimal text. Readers validate shards against the manifest and
the index before reading, so a damaged shard fails in one line that names it. Only this module reads and
writes the manifest; `split_mismatch` tells callers when val is not like train.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from webdataset import TarWriter
from webdataset.tariterators import base_plus_ext

from hpcgan.data.reader import DataError

MANIFEST = "manifest.json"
FORMAT = "hpcgan-shards/1"
INDEX_VERSION = "v1.2"
SPLITS = ("train", "val")


def png_key(size: int) -> str:
    """The member extension of a sample's image at `size`: `64.png`."""
    return f"{size}.png"


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def index_path(tar: Path) -> Path:
    return tar.with_suffix(".idx")


def is_shard_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


class ShardWriter:
    """Write one tar shard with `webdataset.TarWriter`, then its index; reproducible bytes (fixed
    mtime/owner), atomic rename on close."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = path.with_name(path.name + ".part")
        self._file = open(self._tmp, "wb")
        self._tar = TarWriter(self._file, user="", group="", mode=0o444, mtime=0, encoder=False)
        self._samples = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        # One member per write(): TarWriter sorts a sample's members, this keeps the caller's order.
        for ext, data in members.items():
            self._tar.write({"__key__": key, ext: data})
        self._samples += 1

    def close(self) -> dict[str, Any]:
        """Finish the shard; return its manifest record."""
        self._tar.close()
        self._file.close()
        lines = scan_index(self._tmp)
        if len(lines) != self._samples:
            raise DataError(f"{self.path}: wrote {self._samples} samples but the tar groups into {len(lines)} "
                            "(keys must not contain dots and must differ between neighbours)")
        index = self.path.with_suffix(".idx")
        index_tmp = index.with_name(index.name + ".part")
        index_tmp.write_text(f"{INDEX_VERSION} {len(lines)}\n" + "".join(f"{line}\n" for line in lines))
        digest = hashlib.sha256()
        with open(self._tmp, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        os.replace(index_tmp, index)
        os.replace(self._tmp, self.path)
        return {"name": self.path.name, "index": index.name, "samples": len(lines),
                "bytes": self.path.stat().st_size, "sha256": digest.hexdigest()}


def scan_index(tar: Path) -> list[str]:
    """The wds2idx v1.2 index lines of a tar, from its headers: one line per sample (consecutive members
    with one key, split at the first dot of the name as webdataset does), `<ext> <data offset> <size>
    <member name>` per member."""
    lines: list[list[str]] = []
    current = None
    with tarfile.open(tar, "r:") as f:
        for info in f:
            if not info.isreg():
                continue
            key, ext = base_plus_ext(info.name)
            if key is None:
                continue
            entry = f"{ext} {info.offset_data} {info.size} {info.name}"
            if key == current:
                lines[-1].append(entry)
            else:
                lines.append([entry])
                current = key
    return [" ".join(line) for line in lines]


def read_index(path: Path, tar: Path) -> list[dict[str, tuple[int, int, str]]]:
    """Parse a wds2idx v1.2 index: per sample, extension -> (data offset, size, member name)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{tar}: index file {path.name} is missing; re-run hpcgan prepare "
                        "(or create it with DALI's wds2idx)") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit() or int(head[1]) != len(lines) - 1:
        raise DataError(f"{tar}: index file {path.name} is not a {INDEX_VERSION} index of "
                        f"{len(lines) - 1} samples; re-run hpcgan prepare")
    samples = []
    for number, line in enumerate(lines[1:], 2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise DataError(f"{tar}: line {number} of {path.name} is malformed; re-run hpcgan prepare")
        try:
            samples.append({fields[i]: (int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                            for i in range(0, len(fields), 4)})
        except ValueError:
            raise DataError(f"{tar}: line {number} of {path.name} is malformed; re-run hpcgan prepare") from None
    return samples


def read_manifest(shard_dir: Path) -> dict[str, Any]:
    path = Path(shard_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{shard_dir}: no {MANIFEST}; create shards with hpcgan prepare") from None
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON ({err}); re-run hpcgan prepare") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}; re-run hpcgan prepare")
    return manifest


def fingerprint(shard_dir: Path) -> str:
    """A short hash of the manifest: names one prepared data set in caches (floors, feature spaces)."""
    return hashlib.sha256((Path(shard_dir) / MANIFEST).read_bytes()).hexdigest()[:16]


def split_mismatch(shard_dir: Path) -> str | None:
    """One line saying how val differs from train in contrast or source kind, or None when it does not.

    Val metrics of such shards measure that difference, not generalisation. None too when there is no
    val split or the manifest predates these records. The line starts with the folder, without a
    "warning:" prefix.
    """
    manifest = read_manifest(shard_dir)
    if not manifest.get("counts", {}).get("val"):
        return None
    differences = []
    for field, what in (("contrasts", "contrast"), ("kinds", "source kind"), ("class_counts", "class")):
        train, val = (sorted(manifest.get(field, {}).get(split, {})) for split in SPLITS)
        if train != val:
            differences.append(f"{what} (train {', '.join(n or 'unknown' for n in train) or 'none'}; "
                               f"val {', '.join(n or 'unknown' for n in val) or 'none'})")
    if not differences:
        return None
    return (f"{shard_dir}: val differs from train in {' and '.join(differences)}, so val metrics measure that "
            "difference, not generalisation; re-run hpcgan prepare with --split slab, or with val subjects of "
            "the same contrasts and kinds as train")


def write_manifest(shard_dir: Path, manifest: dict[str, Any]) -> None:
    tmp = shard_dir / (MANIFEST + ".part")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, shard_dir / MANIFEST)


def encode_png(image: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """A uint8 (H, W) slice as PNG bytes, with `text` as tEXt chunks (e.g. a synthetic-data mark)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_shard_set(out: Path, images: np.ndarray, metas: list[dict[str, Any]], extra: dict[str, Any],
                    shard_size: int = 1000, png_text: dict[str, str] | None = None,
                    labels: Sequence[int] | None = None, classes: Sequence[str] = ()) -> dict[str, Any]:
    """A training split of uint8 (N, H, W) slices as shards any reader serves, with their manifest;
    `extra` goes into the manifest (e.g. provenance). With `classes`, `labels` holds each slice's index
    into them, written as its `cls` member, so readers return it. Returns the manifest."""
    index = np.asarray([] if labels is None else labels, dtype=np.int64)
    if classes and (index.shape != (len(images),) or not ((index >= 0) & (index < len(classes))).all()):
        raise ValueError(f"write_shard_set: {len(images)} images need as many labels, each an index of the "
                         f"{len(classes)} classes, when classes are given")
    out.mkdir(parents=True, exist_ok=True)
    size = int(images.shape[-1])
    records = []
    for number, start in enumerate(range(0, len(images), shard_size)):
        writer = ShardWriter(out / shard_name("train", number))
        for i in range(start, min(start + shard_size, len(images))):
            parts = {png_key(size): encode_png(images[i], png_text)}
            if classes:
                parts["cls"] = str(index[i]).encode()
            writer.add(f"s{i:07d}", parts | {"json": json.dumps(metas[i], sort_keys=True).encode()})
        records.append(writer.close() | {"split": "train"})
    manifest = {"format": FORMAT, "sizes": [size], "bit_depth": 8, "channels": 1, "shards": records,
                "counts": {"train": len(images), "val": 0}, **extra}
    if classes:
        counts = np.bincount(index, minlength=len(classes))
        manifest |= {"classes": list(classes),
                     "class_counts": {"train": {c: int(n) for c, n in zip(classes, counts) if n}, "val": {}}}
    write_manifest(out, manifest)
    return manifest


@dataclass(frozen=True)
class Split:
    """One split of a shard folder at one resolution, validated: where each sample's PNG lies, and its
    class."""

    shard_dir: Path
    name: str  # train | val
    size: int
    tars: list[Path]
    refs: np.ndarray  # (N, 3) int64: tar number, data offset, byte size of the sample's PNG
    labels: np.ndarray  # (N,) int64: class index of each sample (all 0 when the folder has no classes)
    classes: tuple[str, ...]  # the manifest's class names, () when unlabelled

    @property
    def num_images(self) -> int:
        return len(self.refs)

    @property
    def indexes(self) -> list[Path]:
        return [index_path(t) for t in self.tars]


def _check_member(tar: Path, f: Any, offset: int, size: int, name: str) -> None:
    """The tar header right before `offset` must name the member the index says."""
    f.seek(offset - tarfile.BLOCKSIZE)
    try:
        info = tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape")
    except tarfile.TarError:
        info = None
    if info is None or info.name != name or info.size != size:
        raise DataError(f"{tar}: its index file does not match the tar (no member {name} at byte "
                        f"{offset}); re-run hpcgan prepare")


def open_split(shard_dir: Path, split: str, size: int | None = None) -> Split:
    """Validate a split's shards (presence, size, index) and collect its samples' PNG locations."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    sizes = [int(s) for s in manifest["sizes"]]
    size = sizes[0] if size is None else size
    if size not in sizes:
        raise DataError(f"{shard_dir}: shards hold sizes {sizes}, not {size}; run hpcgan prepare "
                        f"--size {','.join(str(s) for s in sorted({*sizes, size}))} or train at one of them")
    ext = png_key(size)
    classes = tuple(manifest.get("classes") or ())
    tars: list[Path] = []
    refs: list[tuple[int, int, int]] = []
    labels: list[int] = []
    for record in (r for r in manifest["shards"] if r["split"] == split):
        tar = shard_dir / record["name"]
        if not tar.is_file():
            raise DataError(f"{tar}: shard listed in {MANIFEST} is missing; re-run hpcgan prepare")
        actual = tar.stat().st_size
        if actual != record["bytes"]:
            raise DataError(f"{tar}: {actual} bytes, {MANIFEST} says {record['bytes']} (truncated or "
                            "replaced); re-run hpcgan prepare")
        samples = read_index(shard_dir / record["index"], tar)
        if len(samples) != record["samples"]:
            raise DataError(f"{tar}: index lists {len(samples)} samples, {MANIFEST} says "
                            f"{record['samples']}; re-run hpcgan prepare")
        number = len(tars)
        for sample in samples:
            if ext not in sample:
                name = next(iter(sample.values()))[2].split(".", 1)[0]
                raise DataError(f"{tar}: sample {name} has no {ext}; re-run hpcgan prepare")
            offset, length, _ = sample[ext]
            if offset < tarfile.BLOCKSIZE or offset + length > actual:
                raise DataError(f"{tar}: its index file points past the end of the tar; re-run hpcgan prepare")
            refs.append((number, offset, length))
        if samples:
            with open(tar, "rb") as f:
                for sample in (samples[0], samples[-1]):
                    _check_member(tar, f, *sample[ext])
                if classes:
                    labels += _read_classes(tar, f, samples, len(classes))
        tars.append(tar)
    return Split(shard_dir, split, size, tars, np.array(refs, dtype=np.int64).reshape(-1, 3),
                 np.array(labels if classes else [0] * len(refs), dtype=np.int64), classes)


def _read_classes(tar: Path, f: Any, samples: list[dict[str, tuple[int, int, str]]], n_classes: int) -> list[int]:
    """The `cls` member of each sample of an open tar, checked against the manifest's classes."""
    out = []
    for sample in samples:
        if "cls" not in sample:
            name = next(iter(sample.values()))[2].split(".", 1)[0]
            raise DataError(f"{tar}: sample {name} has no cls (its class), though {MANIFEST} lists classes; "
                            "re-run hpcgan prepare")
        offset, length, name = sample["cls"]
        f.seek(offset)
        data = f.read(length)
        if len(data) != length:
            raise DataError(f"{tar}: its index file points past the end of the tar; re-run hpcgan prepare")
        out.append(class_index(data, n_classes, f"{tar} ({name})"))
    return out


def class_index(data: bytes, n_classes: int, where: str) -> int:
    """A `cls` member's bytes -> its class index, which must name one of the `n_classes` classes."""
    text = data.decode("ascii", "replace").strip()
    if not text.isdigit() or int(text) >= n_classes:
        raise DataError(f"{where}: class {text[:20]!r} is not an index of the {n_classes} classes in {MANIFEST}; "
                        "re-run hpcgan prepare")
    return int(text)


def decode_png(data: bytes, where: str, size: int) -> np.ndarray:
    """PNG bytes -> uint8 (H, W); 16-bit PNGs are scaled as round(v / 257), as DALI's decoder does."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            pixels = np.asarray(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{where}: not a decodable PNG ({type(err).__name__}); re-run hpcgan prepare") from None
    if pixels.dtype != np.uint8:
        pixels = ((pixels.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8)
    if pixels.shape != (size, size):
        raise DataError(f"{where}: image of shape {pixels.shape}, expected ({size}, {size}); "
                        "re-run hpcgan prepare")
    return pixels


def decode_split(split: Split, workers: int = 1) -> np.ndarray:
    """Decode every image of a split, in shard order, into one uint8 (N, H, W) array."""
    out = np.empty((split.num_images, split.size, split.size), dtype=np.uint8)

    def decode_shard(number: int) -> None:
        rows = np.flatnonzero(split.refs[:, 0] == number)
        tar = split.tars[number]
        blob = tar.read_bytes()
        for row in rows:
            _, offset, length = split.refs[row]
            out[row] = decode_png(blob[offset:offset + length], f"{tar} (byte {offset})", split.size)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(decode_shard, range(len(split.tars))))
    return out
