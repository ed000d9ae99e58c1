"""Find the inputs of `hpcgan prepare` and group them into volumes, subjects and labels.

Kinds: 2D images (PNG/JPG/TIFF/BMP), NIfTI volumes (.nii, .nii.gz; 3D or 4D) and DICOM series (grouped
by series UID). A subject is what the train/val split keeps together: the DICOM patient, a BIDS
`sub-XX` part of the path, or a `--subject-regex` match on the file name; without one, each volume (or
2D image) is its own subject. A label is the name of the folder holding an image or NIfTI file, kept
for reference; the classes readers return are set from `prepare --labels` (hpcgan/data/labels.py). A
contrast (T1w, FLAIR, GM, ...) is read from a word of an image or NIfTI file name, so that a split whose
val holds other contrasts than its train can be told apart from one that generalises.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hpcgan.data import dicom
from hpcgan.data.images import IMAGE_SUFFIXES
from hpcgan.data.reader import DataError

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}
_BIDS_SUBJECT = re.compile(r"^(sub-[A-Za-z0-9]+)(?:$|[_.])")
_BIDS_FOLDERS = {"anat", "func", "dwi", "fmap", "perf", "pet"}  # data-type folders, not class labels
_PREFIX = {"image": "img", "nifti": "nii", "dicom": "dcm"}
_CONTRASTS = {  # a word of a file name (BIDS suffix, BraTS or template naming) -> the contrast's name
    "t1": "T1w", "t1w": "T1w", "mprage": "T1w", "t1ce": "T1gd", "t1gd": "T1gd", "t2": "T2w", "t2w": "T2w",
    "flair": "FLAIR", "pd": "PDw", "pdw": "PDw", "t2star": "T2starw", "t2starw": "T2starw", "swi": "SWI",
    "dwi": "DWI", "bold": "BOLD", "gm": "GM", "wm": "WM", "csf": "CSF",
}


@dataclass(frozen=True)
class Volume:
    """One unit of input: a 2D image, a NIfTI file (all its frames) or a DICOM series."""

    kind: str  # image | nifti | dicom
    files: tuple[Path, ...]
    sha256: str  # of the file; for a DICOM series, of its files' hashes in sorted order
    display: str  # how reports name it: a path for images/NIfTI, never a DICOM header value
    label: str
    subject_key: str  # what the split keeps together; in memory only (may hold a DICOM patient ID)
    has_subject: bool  # False: the subject is the volume itself
    contrast: str = ""  # T1w, FLAIR, GM, ...; "" when the file name does not say
    root: Path = Path()  # the SRC it was found under: class folders and label tables are relative to it
    subject_name: str = ""  # the subject as the data names it (sub-01, a regex match, a PatientID); in memory only
    cls: str = ""  # its class under `prepare --labels` (folder, contrast or table); "" otherwise

    @property
    def volume_id(self) -> str:
        return f"{_PREFIX[self.kind]}-{self.sha256[:12]}"


@dataclass(frozen=True)
class Problem:
    source: str
    reason: str


@dataclass
class Discovery:
    volumes: list[Volume]
    problems: list[Problem]
    ignored: int  # files of no known kind (BIDS sidecars, notes, ...)
    duplicates: int  # files whose content equals an earlier input's


class HashCache:
    """sha256 of file contents keyed by (path, size, mtime), so a re-run does not re-read unchanged inputs.

    Keys are hashes too: the cache file holds no path, since folder names may name patients.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, str] = {}
        if path is not None and path.is_file():
            try:
                self.entries = dict(json.loads(path.read_text()))
            except (ValueError, TypeError):
                self.entries = {}

    def sha256(self, file: Path) -> str:
        stat = file.stat()
        key = hashlib.sha256(f"{file.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
        if key not in self.entries:
            digest = hashlib.sha256()
            with open(file, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            self.entries[key] = digest.hexdigest()
        return self.entries[key]

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.path)


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "image"
    if name.endswith(_NIFTI_SUFFIXES):
        return "nifti"
    if path.suffix.lower() in _DICOM_SUFFIXES or dicom.has_dicom_magic(path):
        return "dicom"
    return None


def _label(rel: Path) -> str:
    if len(rel.parts) < 2:
        return ""
    parent = rel.parts[-2]
    if parent in _BIDS_FOLDERS or parent.startswith(("sub-", "ses-")):
        return ""
    return parent


def contrast(name: str) -> str:
    """The contrast a file name states, its last word that names one (`sub-01_T1w.nii.gz` -> T1w,
    `BraTS_001_flair.nii` -> FLAIR, `mni_icbm152_gm_tal_nlin_sym_09a.nii` -> GM); "" when none does."""
    words = re.split(r"[^a-z0-9]+", name.lower().removesuffix(".gz").rsplit(".", 1)[0])
    return next((_CONTRASTS[w] for w in reversed(words) if w in _CONTRASTS), "")


def _subject(root: int, rel: Path, regex: re.Pattern[str] | None) -> tuple[str, str] | None:
    """(key, name) of the subject a path states: the key is scoped to its SRC, the name as written."""
    for part in rel.parts:
        if m := _BIDS_SUBJECT.match(part):
            return f"{root}/{m.group(1)}", m.group(1)
    if regex is not None and (m := regex.search(rel.name)):
        name = m.group(1) if m.groups() else m.group(0)
        return f"{root}/re:{name}", name
    return None


def _files(root: Path, exclude: Path | None) -> list[Path]:
    if root.is_file():
        return [root]
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here = Path(folder)
        if exclude is not None and (here == exclude or exclude in here.parents):
            dirs[:] = []
            continue
        found.extend(here / n for n in sorted(names) if not n.startswith("."))
    return found


def discover(sources: list[Path], *, subject_regex: re.Pattern[str] | None = None,
             exclude: Path | None = None, workers: int = 4, hashes: HashCache | None = None,
             echo: Callable[[str], None] = lambda _: None) -> Discovery:
    """Walk the sources, hash every input, read DICOM headers, and group files into volumes."""
    hashes = hashes or HashCache(None)
    exclude = exclude.resolve() if exclude is not None else None
    problems: list[Problem] = []
    candidates: list[tuple[int, Path, Path, str]] = []  # root index, file, path under root, kind
    ignored = 0
    for index, root in enumerate(sources):
        if not root.exists():
            problems.append(Problem(str(root), "does not exist"))
            continue
        found = 0
        for file in _files(root, exclude):
            try:
                kind = _kind(file)
            except OSError as err:
                problems.append(Problem(str(file), f"unreadable ({err.strerror})"))
                continue
            if kind is None:
                ignored += 1
                continue
            found += 1
            candidates.append((index, file, file.relative_to(root) if root.is_dir() else Path(file.name),
                               kind))
        if not found:
            problems.append(Problem(str(root), "no PNG/JPG/TIFF, NIfTI or DICOM files found"))

    echo(f"hashing {len(candidates)} input files")
    with ThreadPoolExecutor(max(1, workers)) as pool:
        digests = list(pool.map(lambda c: hashes.sha256(c[1]), candidates))
        dicom_files = [c[1] for c in candidates if c[3] == "dicom"]
        dicom_headers = dict(zip(dicom_files, pool.map(_scan_dicom, dicom_files), strict=True))

    seen: set[str] = set()
    duplicates = 0
    volumes: list[Volume] = []
    series: dict[str, list[tuple[Path, str, str, int]]] = defaultdict(list)
    for (root, file, rel, kind), digest in zip(candidates, digests, strict=True):
        if digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        if kind == "dicom":
            header = dicom_headers[file]
            if isinstance(header, str):
                problems.append(Problem(str(file), header))
            else:
                series[header.series].append((file, digest, header.patient, root))
            continue
        subject = _subject(root, rel, subject_regex)
        display = str(sources[root] / rel) if sources[root].is_dir() else str(sources[root])
        key, name = subject or (f"file/{digest}", "")
        volumes.append(Volume(kind, (file,), digest, display, _label(rel), key, subject is not None,
                              contrast(rel.name), sources[root], name))
    for members in series.values():
        members.sort(key=lambda m: m[1])
        digest = hashlib.sha256("".join(m[1] for m in members).encode()).hexdigest()
        patient, root = members[0][2], members[0][3]
        volume_id = f"{_PREFIX['dicom']}-{digest[:12]}"
        volumes.append(Volume("dicom", tuple(m[0] for m in members), digest,
                              f"DICOM series {volume_id} ({len(members)} files in {sources[root]})", "",
                              f"dicom-patient/{patient}" if patient else f"file/{digest}", bool(patient),
                              root=sources[root], subject_name=patient or ""))
    volumes.sort(key=lambda v: (v.kind, v.sha256))
    return Discovery(volumes, problems, ignored, duplicates)


def _scan_dicom(path: Path) -> dicom.DicomFile | str:
    try:
        return dicom.scan(path)
    except DataError as err:
        return str(err)


def read_image(path: Path) -> np.ndarray:
    """A 2D input image as float32 (H, W) grayscale, upright per its EXIF orientation."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                return np.asarray(img, dtype=np.float32)
            return np.asarray(img.convert("L"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        detail = "" if str(path) in str(err) else f": {err}"  # the report names the file already
        raise DataError(f"cannot decode image ({type(err).__name__}{detail})") from None


def read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A NIfTI file as float32 (X, Y, Z[, T]) in RAS+ voxel order, with its voxel size in mm."""
    try:
        image = nib.load(path)
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for broken headers
        raise DataError(f"not a readable NIfTI file ({type(err).__name__}: {err})") from None
    shape = tuple(image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise DataError(f"a 2D image stored as a volume (shape {tuple(image.shape)}): prepare needs a "
                        "3D or 4D volume; save 2D slices as PNG instead")
    if len(shape) > 4:
        raise DataError(f"a {len(shape)}D NIfTI (shape {tuple(image.shape)}): prepare reads 3D or 4D volumes")
    try:
        image = nib.as_closest_canonical(image)
        data = np.asarray(image.get_fdata(dtype=np.float32)).reshape(image.shape[:3] + shape[3:])
    except Exception as err:  # noqa: BLE001 - EOFError, zlib.error, OSError, ...
        raise DataError(f"truncated or corrupt NIfTI data ({type(err).__name__}: {err})") from None
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return data, zooms  # type: ignore[return-value]
