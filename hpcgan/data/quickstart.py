"""The quickstart data set: real brain MRI that ships inside nilearn, so nothing is downloaded.

nilearn bundles the ICBM 2009a nonlinear symmetric MNI152 template (T1, 1 mm, 197x233x189) and its
grey- and white-matter probability maps: one brain in three contrasts, about 1,070 distinct slices along
the three axes. A split by volume would validate on a contrast training never saw, so the quickstart
uses the slab split: every map gives slabs of slices to val, the same slabs for all three (one voxel
grid), and each sample records its contrast (T1w, GM, WM). Its classes are the slicing axes (axial,
coronal, sagittal): every volume gives all three, so a conditional model and the utility test have a
task with the same classes in train and val. See docs/data.md for the choice, origin and licence.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from hpcgan.data.prepare import Options, prepare
from hpcgan.data.preprocess import Settings
from hpcgan.data.reader import DataError

NOTICE = ("ICBM 2009a nonlinear symmetric MNI152 template, as bundled with nilearn. Copyright (C) 1993-2009 "
          "Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University. "
          "Permission to use, copy, modify, and distribute this software and its documentation for any purpose "
          "and without fee is hereby granted, provided that the above copyright notice appear in all copies.")


def template_files() -> list[Path]:
    """The T1 template and its grey/white matter maps inside the installed nilearn package."""
    spec = importlib.util.find_spec("nilearn")  # locate without importing: nilearn.datasets imports sklearn
    if spec is None or not spec.submodule_search_locations:
        raise DataError("nilearn is not installed; the quickstart data ships inside it: pip install nilearn")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    files = [folder / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz" for kind in ("t1", "gm", "wm")]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: not found; the quickstart needs nilearn>=0.10 (pip install nilearn)")
    return files


def default_quickstart_dir(size: int = 64) -> Path:
    """Where `--data quickstart` keeps its shards: $HPCGAN_CACHE, else $XDG_CACHE_HOME/hpcgan, else
    ~/.cache/hpcgan; one folder per size."""
    root = os.environ.get("HPCGAN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hpcgan"
    return Path(root) / f"quickstart-{size}"


def quickstart_shards(out_dir: Path, size: int = 64) -> Path:
    """Prepare the quickstart shards in `out_dir` (a fast no-op when they are already there); return it."""
    out_dir = Path(out_dir)
    report = prepare(template_files(), out_dir, Settings(sizes=(size,)),
                     Options(workers=1, progress=False, split="slab", labels="axis"), echo=lambda _: None)
    if report.exit_code:
        raise DataError(f"{out_dir}: preparing the quickstart shards failed "
                        f"({'; '.join(p.reason for p in report.problems) or 'see hpcgan prepare'})")
    (out_dir / "NOTICE").write_text(NOTICE + "\n")
    return out_dir
