"""DICOM series -> one RAS+ volume, carrying over nothing but geometry and modality.

The privacy rule lives here: header values other than the pixel geometry, rescale and modality are read
only to group files (series UID) and subjects (patient ID) in memory, and never leave this module in
any string. Error reasons name the problem, never a header value. pydicom itself quotes header values
in its validation warnings and log records ("Invalid value for VR DA: '19461231'"), so importing this
module turns value validation on reading off and silences pydicom's logger and warnings.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from hpcgan.data.reader import DataError

pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
logging.getLogger("pydicom").disabled = True
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class DicomFile:
    path: Path
    series: str  # SeriesInstanceUID: groups files into volumes, in memory only
    patient: str  # PatientID: groups series into subjects, in memory only; "" when absent


@dataclass(frozen=True)
class DicomVolume:
    data: np.ndarray  # (X, Y, Z) float32, RAS+ voxel order when the geometry is known
    zooms: tuple[float, float, float]
    modality: str
    dropped: list[tuple[Path, str]]  # files of the series left out, with the reason


def has_dicom_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:132] == b"DICM"


def scan(path: Path) -> DicomFile:
    """Read the header only (pixel data deferred); raise DataError with a reason when unusable."""
    try:
        ds = pydicom.dcmread(path, defer_size=1024, force=not has_dicom_magic(path))
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for broken files
        raise DataError(f"not a readable DICOM file ({type(err).__name__})") from None
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise DataError("DICOM without pixel data (a report, structured document or "
                        "presentation state?): skipped")
    series = str(ds.get("SeriesInstanceUID", "") or "")
    if not series:
        raise DataError("DICOM without a series UID: cannot group it into a volume")
    return DicomFile(path, series, str(ds.get("PatientID", "") or ""))


@dataclass
class _Plane:
    pixels: np.ndarray  # (rows, cols)
    position: np.ndarray | None  # ImagePositionPatient (LPS mm)
    orientation: np.ndarray | None  # ImageOrientationPatient: row cosine, column cosine
    spacing: tuple[float, float] | None  # PixelSpacing: between rows, between columns
    number: int  # InstanceNumber / frame order, for sorting when positions are unknown
    modality: str
    path: Path


def _floats(value: object, n: int) -> np.ndarray | None:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) else None


def _first(ds: Dataset, sequence: str, item: str) -> Dataset | None:
    try:
        return ds[sequence][0][item][0]
    except (KeyError, IndexError, TypeError):
        return None


def _planes(path: Path) -> list[_Plane]:
    """The 2D planes of one file: one for classic DICOM, one per frame for enhanced multi-frame."""
    try:
        ds = pydicom.dcmread(path, force=not has_dicom_magic(path))
    except Exception as err:  # noqa: BLE001
        raise DataError(f"not a readable DICOM file ({type(err).__name__})") from None
    try:
        pixels = np.asarray(ds.pixel_array, dtype=np.float32)
    except Exception as err:  # noqa: BLE001 - missing codec, bad length, ...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = f" (transfer syntax {syntax.name}: install pylibjpeg or gdcm for compressed DICOM)" \
            if syntax is not None and syntax.is_compressed else ""
        raise DataError(f"cannot decode DICOM pixel data ({type(err).__name__}){hint}") from None
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    pixels = pixels * slope + intercept
    modality = str(ds.get("Modality", "") or "")
    modality = modality if modality.isalnum() and len(modality) <= 4 else ""
    if pixels.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:  # enhanced multi-frame
        shared = _first(ds, "SharedFunctionalGroupsSequence", "PixelMeasuresSequence")
        orient = _first(ds, "SharedFunctionalGroupsSequence", "PlaneOrientationSequence")
        spacing = _floats(shared.get("PixelSpacing"), 2) if shared is not None else None
        iop = _floats(orient.get("ImageOrientationPatient"), 6) if orient is not None else None
        frames = ds.get("PerFrameFunctionalGroupsSequence", [])
        planes = []
        for i, frame in enumerate(pixels):
            pos = None
            if i < len(frames) and "PlanePositionSequence" in frames[i]:
                pos = _floats(frames[i].PlanePositionSequence[0].get("ImagePositionPatient"), 3)
            planes.append(_Plane(frame, pos, iop, None if spacing is None else tuple(spacing), i,
                                 modality, path))
        return planes
    if pixels.ndim != 2:
        raise DataError(f"DICOM pixel data of shape {pixels.shape} is not a grayscale image")
    spacing = _floats(ds.get("PixelSpacing"), 2)
    return [_Plane(pixels, _floats(ds.get("ImagePositionPatient"), 3),
                   _floats(ds.get("ImageOrientationPatient"), 6),
                   None if spacing is None else (float(spacing[0]), float(spacing[1])),
                   int(ds.get("InstanceNumber", 0) or 0), modality, path)]


def load_series(files: list[Path]) -> DicomVolume:
    """Stack a series' planes in slice-position order and reorient to RAS+ via the DICOM geometry."""
    dropped: list[tuple[Path, str]] = []
    planes: list[_Plane] = []
    for path in files:
        try:
            planes.extend(_planes(path))
        except DataError as err:
            dropped.append((path, str(err)))
    if not planes:
        raise DataError("no decodable slice in the series")
    shape = Counter(p.pixels.shape for p in planes).most_common(1)[0][0]
    for p in planes:
        if p.pixels.shape != shape:
            dropped.append((p.path, f"slice size {p.pixels.shape} differs from the series' {shape}"))
    planes = [p for p in planes if p.pixels.shape == shape]

    geometry = all(p.position is not None and p.orientation is not None for p in planes)
    if geometry:
        row_dir, col_dir = planes[0].orientation[:3], planes[0].orientation[3:]
        normal = np.cross(row_dir, col_dir)
        planes.sort(key=lambda p: float(p.position @ normal))
        depth = np.array([float(p.position @ normal) for p in planes])
        keep = np.concatenate([[True], np.diff(depth) > 1e-3])
        for p in (p for p, k in zip(planes, keep, strict=True) if not k):
            dropped.append((p.path, "repeated slice position (multi-echo or time series?): kept the first"))
        planes = [p for p, k in zip(planes, keep, strict=True) if k]
        depth = depth[keep]
        step = float(np.median(np.diff(depth))) if len(planes) > 1 else 1.0
    else:
        planes.sort(key=lambda p: p.number)
        step = 1.0
    row_mm, col_mm = planes[0].spacing or (1.0, 1.0)
    # voxel (i, j, k) = (column, row, slice)
    data = np.stack([p.pixels.T for p in planes], axis=-1).astype(np.float32)
    if not geometry:
        return DicomVolume(data, (col_mm, row_mm, step), planes[0].modality, dropped)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * col_mm
    affine[:3, 1] = col_dir * row_mm
    affine[:3, 2] = normal * step
    affine[:3, 3] = planes[0].position
    image = nib.as_closest_canonical(nib.Nifti1Image(data, _LPS_TO_RAS @ affine))
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return DicomVolume(np.asarray(image.dataobj, dtype=np.float32), zooms, planes[0].modality,
                       dropped)
