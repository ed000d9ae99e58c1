"""Small inputs the data tests write themselves: brain-like volumes, NIfTI, DICOM, images, shards."""

from __future__ import annotations

import argparse
import hashlib
import io
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from hpcgan.data import prepare, shards

# Header values that must never reach a shard, a manifest or a log.
SECRETS = {
    "PatientName": "Doe^Jane^Secretname",
    "PatientID": "PID-SECRET-4711",
    "PatientBirthDate": "19461231",
    "StudyDate": "20230817",
    "SeriesDate": "20230817",
    "AcquisitionDate": "20230817",
    "InstitutionName": "Hospital Of Secretville",
    "ReferringPhysicianName": "Dr^Who^Secret",
    "StudyDescription": "free text secret remark",
    "SeriesDescription": "secret protocol words",
    "AccessionNumber": "ACC-SECRET-99",
    "ImageComments": "patient is a secret agent",
}


def brain(shape: tuple[int, int, int] = (20, 24, 18), seed: int = 0, scale: float = 1000.0) -> np.ndarray:
    """An ellipsoid 'brain' with smooth texture in a larger empty field, as integers (DICOM-friendly)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt(sum((g / r) ** 2 for g, r in zip(grid, (0.8, 0.85, 0.75), strict=True)))
    texture = 0.6 + 0.4 * np.sin(grid[0] * (3 + seed) + grid[1] * 2.0) * np.cos(grid[2] * 4.0 + seed)
    noise = rng.uniform(0.0, 0.05, size=shape)
    return np.round(np.where(radius < 1.0, texture + noise, 0.0) * scale).astype(np.float32)


def write_nifti(path: Path, data: np.ndarray, zooms: tuple[float, float, float] = (1.0, 1.0, 1.0),
                affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*zooms, 1.0]) if affine is None else affine), path)
    return path


def write_image(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def slice_image(seed: int, size: int = 40) -> np.ndarray:
    """A 2D uint8 'slice': the middle of a brain volume, different per seed."""
    vol = brain((size, size, 8), seed=seed, scale=250.0)
    return vol[:, :, 4].astype(np.uint8)


def write_dicom_series(folder: Path, volume: np.ndarray, *, spacing: tuple[float, float, float] = (1.0, 1.0, 2.0),
                       origin: tuple[float, float, float] = (-10.0, -12.0, 5.0), patient_id: str | None = None,
                       slope: float = 2.0, intercept: float = -100.0, seed: int = 0) -> list[Path]:
    """Axial DICOM slices of `volume` (voxel order i=column, j=row, k=slice; LPS), files in shuffled
    order with shuffled instance numbers, headers full of SECRETS; `dicom_affine` gives the grid's
    RAS affine."""
    folder.mkdir(parents=True, exist_ok=True)
    series, study = generate_uid(), generate_uid()
    rng = np.random.default_rng(seed)
    numbers = rng.permutation(volume.shape[2]) + 1
    stored = np.round((volume - intercept) / slope).astype(np.uint16)
    paths = []
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"img{rng.integers(1 << 30):010d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        for key, value in SECRETS.items():
            setattr(ds, key, value)
        ds.PatientID = patient_id or SECRETS["PatientID"]
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series, study
        ds.Modality = "MR"
        ds.InstanceNumber = int(numbers[k])
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[2]]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # between rows (j), between columns (i)
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows = j, columns = i
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dicom_affine(spacing: tuple[float, float, float], origin: tuple[float, float, float]) -> np.ndarray:
    """The RAS affine of `write_dicom_series`' voxel grid (axial, LPS row/column directions +x, +y)."""
    lps = np.diag([*spacing, 1.0])
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def write_dicom_without_pixels(path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    for key, value in SECRETS.items():
        setattr(ds, key, value)
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.Modality = generate_uid(), "MR"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def run_prepare(*argv: object) -> int:
    """`hpcgan prepare ARGS` through the subcommand's own parser (what hpcgan/cli.py registers)."""
    parser = argparse.ArgumentParser(prog="hpcgan prepare")
    prepare.add_arguments(parser)
    return prepare.run(parser.parse_args([str(a) for a in argv]))


def make_shards(shard_dir: Path, n_train: int, n_val: int = 0, sizes: tuple[int, ...] = (16,),
                shard_size: int = 40, seed: int = 0, classes: tuple[str, ...] = ()) -> None:
    """A shard folder of random (hence distinct) images, written with the real shard writer.

    With `classes`, each sample's class is `label_of` its largest image: a reader's labels can be checked
    against its images, flips included.
    """
    rng = np.random.default_rng(seed)
    shard_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for split, n in (("train", n_train), ("val", n_val)):
        base = rng.integers(0, 256, size=(n, max(sizes), max(sizes)), dtype=np.uint8)
        for number, start in enumerate(range(0, n, shard_size)):
            writer = shards.ShardWriter(shard_dir / shards.shard_name(split, number))
            for i in range(start, min(n, start + shard_size)):
                parts = {shards.png_key(s): _png(_resized(base[i], s)) for s in sizes}
                if classes:
                    parts["cls"] = b"%d" % label_of(base[i], len(classes))
                parts["json"] = b'{"i": %d}' % i
                writer.add(f"{split}{i:06d}", parts)
            records.append(writer.close() | {"split": split})
    shards.write_manifest(shard_dir, {"format": shards.FORMAT, "sizes": list(sizes), "shards": records,
                                      "counts": {"train": n_train, "val": n_val},
                                      **({"classes": list(classes)} if classes else {})})


def label_of(image: np.ndarray, n_classes: int) -> int:
    """The class `make_shards` gives an image: the sum of its pixels mod n_classes (a flip keeps it)."""
    return int(image.astype(np.int64).sum()) % n_classes


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    return image if image.shape[0] == size else np.asarray(Image.fromarray(image).resize((size, size)))


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every shard, index and manifest in a shard folder."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}
