"""Turn a volume or a 2D image into training slices: the preprocessing made explicit.

Per volume: robust intensity normalisation (percentile clip) to [0, 1]. Per slice: keep it only when
enough of it is brain (foreground fraction), crop to the foreground bounding box, resample to square
pixels, pad to a square and resize to each target size, then quantise to 8 or 16 bit PNG.

Volumes arrive in RAS+ voxel order (x: left->right, y: posterior->anterior, z: inferior->superior), so
the axis names mean what they say and every slice is shown the same way up: superior (or anterior, for
axial slices) at the top, the subject's right on the image's right.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from hpcgan.data.reader import DataError

AXES = ("axial", "coronal", "sagittal")
_AXIS_DIM = {"sagittal": 0, "coronal": 1, "axial": 2}  # the RAS+ dimension a slice is taken across
CROPS = ("volume", "slice", "none")


@dataclass(frozen=True)
class Settings:
    """Everything that decides the pixels of a shard; recorded in the manifest."""

    sizes: tuple[int, ...] = (64,)
    axes: tuple[str, ...] = AXES
    clip: tuple[float, float] = (0.5, 99.5)  # percentiles of the foreground intensities
    foreground_threshold: float = 0.05  # normalised intensity above which a pixel counts as brain
    min_foreground: float = 0.10  # slices whose square holds less brain than this fraction are skipped
    crop: str = "volume"  # bounding box of the whole volume's brain, of each slice's, or none
    bit_depth: int = 8

    def __post_init__(self) -> None:
        if not self.sizes or any(s < 8 for s in self.sizes) or len(set(self.sizes)) != len(self.sizes):
            raise ValueError(f"sizes={self.sizes}: give distinct sizes of at least 8 pixels")
        if not self.axes or any(a not in AXES for a in self.axes):
            raise ValueError(f"axes={self.axes}: choose from {', '.join(AXES)}")
        lo, hi = self.clip
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"clip={self.clip}: need 0 <= low < high <= 100 (percentiles)")
        if not 0.0 <= self.foreground_threshold < 1.0 or not 0.0 <= self.min_foreground <= 1.0:
            raise ValueError("foreground_threshold must be in [0, 1) and min_foreground in [0, 1]")
        if self.crop not in CROPS:
            raise ValueError(f"crop={self.crop!r}: choose from {', '.join(CROPS)}")
        if self.bit_depth not in (8, 16):
            raise ValueError(f"bit_depth={self.bit_depth}: 8 or 16")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Slice:
    axis: str  # axial | coronal | sagittal, or "2d" for an input that was a 2D image
    index: int  # position along the axis in the RAS+ volume (0 for 2D inputs)
    pngs: dict[int, bytes]  # target size -> encoded PNG
    length: int = 1  # slices along the axis in the volume, kept or not (1 for 2D inputs)


def normalise(data: np.ndarray, clip: tuple[float, float]) -> np.ndarray:
    """Clip to percentiles of the foreground (voxels above the minimum) and scale to [0, 1].

    Percentiles over the foreground only, so a large empty field of view does not pull the upper bound
    down; raises DataError for a constant image, which holds no content.
    """
    data = np.asarray(data, dtype=np.float32)
    if not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    low_value = float(data.min())
    foreground = data[data > low_value]
    if foreground.size == 0:
        raise DataError("constant intensity: no content")
    lo, hi = (float(v) for v in np.percentile(foreground, clip))
    if clip[0] == 0.0:
        lo = low_value
    if hi <= lo:
        lo, hi = low_value, float(foreground.max())
    return np.clip((data - lo) / (hi - lo), 0.0, 1.0)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _view(plane: np.ndarray) -> np.ndarray:
    """Rotate a plane cut from a RAS+ volume so that its second voxel axis points up."""
    return np.rot90(plane)


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    out = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
    return np.asarray(out.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32)


def _square(image: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """Resample to square pixels (anisotropic voxels) and zero-pad to a centred square."""
    row_mm, col_mm = spacing
    if abs(row_mm - col_mm) > 0.01 * min(row_mm, col_mm):
        step = min(row_mm, col_mm)
        height = max(1, round(image.shape[0] * row_mm / step))
        width = max(1, round(image.shape[1] * col_mm / step))
        image = np.clip(_resize(image, width, height), 0.0, 1.0)
    height, width = image.shape
    side = max(height, width)
    out = np.zeros((side, side), dtype=np.float32)
    top, left = (side - height) // 2, (side - width) // 2
    out[top:top + height, left:left + width] = image
    return out


def encode_png(image: np.ndarray, bit_depth: int) -> bytes:
    """[0, 1] float -> grayscale PNG (no metadata chunks, so nothing but pixels leaves this function)."""
    scale = 255 if bit_depth == 8 else 65535
    pixels = np.round(image * scale).astype(np.uint8 if bit_depth == 8 else np.uint16)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _finish(image: np.ndarray, bbox: tuple[int, int, int, int] | None, spacing: tuple[float, float],
            settings: Settings) -> dict[int, bytes] | None:
    """Crop, square and resize one normalised slice; None when it holds too little brain."""
    if bbox is None:
        return None
    r0, r1, c0, c1 = bbox
    square = _square(image[r0:r1, c0:c1], spacing)
    if (square > settings.foreground_threshold).mean() < settings.min_foreground:
        return None
    return {size: encode_png(np.clip(_resize(square, size, size), 0.0, 1.0), settings.bit_depth)
            for size in settings.sizes}


def _crop_box(image: np.ndarray, settings: Settings,
              volume_box: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
    if settings.crop == "none":
        return 0, image.shape[0], 0, image.shape[1]
    if settings.crop == "volume" and volume_box is not None:
        return volume_box if _bbox(image > settings.foreground_threshold) is not None else None
    return _bbox(image > settings.foreground_threshold)


def volume_slices(volume: np.ndarray, zooms: tuple[float, float, float],
                  settings: Settings) -> tuple[list[Slice], int]:
    """All kept slices of a 3D RAS+ volume along the configured axes, and how many were skipped.

    A volume one voxel thick (a single-slice DICOM series) is a 2D image: it is cut across that axis
    only, whatever the configured axes.
    """
    data = normalise(volume, settings.clip)
    mask = data > settings.foreground_threshold
    kept: list[Slice] = []
    skipped = 0
    flat = [axis for axis, dim in _AXIS_DIM.items() if data.shape[dim] == 1]
    for axis in flat[:1] or settings.axes:
        dim = _AXIS_DIM[axis]
        in_plane = [z for d, z in enumerate(zooms) if d != dim]
        spacing = (float(in_plane[1]), float(in_plane[0]))  # rows follow the second axis after _view
        volume_box = _bbox(_view(mask.any(axis=dim)))
        for index in range(data.shape[dim]):
            image = _view(data[(slice(None),) * dim + (index,)])  # a view; np.take would copy the volume
            pngs = _finish(image, _crop_box(image, settings, volume_box), spacing, settings)
            if pngs is None:
                skipped += 1
            else:
                kept.append(Slice(axis, index, pngs, data.shape[dim]))
    return kept, skipped


def image_slices(image: np.ndarray, settings: Settings) -> tuple[list[Slice], int]:
    """The one slice of a 2D input image (already upright), or none when it holds too little brain."""
    data = normalise(image, settings.clip)
    pngs = _finish(data, _crop_box(data, settings, _bbox(data > settings.foreground_threshold)),
                   (1.0, 1.0), settings)
    return ([Slice("2d", 0, pngs)], 0) if pngs is not None else ([], 1)

