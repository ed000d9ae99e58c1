"""No identifying path in what `prepare` writes: relative source paths always, and with --anonymize no
path, no folder name and salted subject ids, the key from subject to id kept beside the shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from data_factories import brain, run_prepare, slice_image, write_dicom_series, write_image, write_nifti

NAME = "DOE_JOHN_1957"  # a patient's name and birth year, as folder names on clinical shares carry them


def _patient_named_sources(root: Path) -> Path:
    """NIfTI volumes and PNG slices in folders (and files) named after the patient."""
    src = root / f"export_{NAME}"
    for i in range(3):
        write_nifti(src / f"{NAME}_{i}" / "anat" / f"sub-{i:02d}_T1w.nii.gz", brain(seed=i))
    for i in range(4):
        write_image(src / "slices" / NAME / f"{NAME}_{i}.png", slice_image(i))
    return src


def _every_byte(folder: Path) -> bytes:
    """All files under `folder`, with each tar's members uncompressed and their names."""
    blobs = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        blobs.append(str(path.relative_to(folder)).encode())
        data = path.read_bytes()
        blobs.append(data)
        if path.suffix == ".tar":
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar.getmembers():
                    blobs.append(member.name.encode())
                    blobs.append(tar.extractfile(member).read())
    return b"\n".join(blobs)


def test_anonymized_shards_hold_no_name_and_the_key_lies_beside_them(tmp_path, capsys):
    src = _patient_named_sources(tmp_path)
    out = tmp_path / "shards"
    assert run_prepare(src, "--out", out, "--size", "32", "--workers", "1", "--anonymize", "--val-frac", "0.3") == 0
    everything = _every_byte(out)
    assert NAME.encode() not in everything and NAME.lower().encode() not in everything.lower()
    assert str(tmp_path).encode() not in everything
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["anonymized"] is True and "roots" not in manifest
    assert all("path" not in source for source in manifest["sources"])

    key = out.parent / "shards.subjects.json"
    assert f"subject key (subject -> id, and the salt; keep it private, apart from the shards): {key}" in \
        capsys.readouterr().out
    assert key.stat().st_mode & 0o077 == 0  # the owner's alone
    table = json.loads(key.read_text())
    ids = set(table["subjects"].values())
    assert {f"sub-{i:02d}" for i in range(3)} <= table["subjects"].keys()  # BIDS subjects, as the data names them
    with tarfile.open(out / "train-000000.tar") as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert {m["subject"] for m in metas} <= ids and all("label" not in m for m in metas)

    # Another build, another salt: the ids of one cannot be matched with those of the other.
    again = tmp_path / "again"
    assert run_prepare(src, "--out", again, "--size", "32", "--workers", "1", "--anonymize", "--val-frac", "0.3") == 0
    other = json.loads((tmp_path / "again.subjects.json").read_text())
    assert other["salt"] != table["salt"] and not ids & set(other["subjects"].values())
    # A given salt gives the same ids.
    for name in ("s1", "s2"):
        assert run_prepare(src, "--out", tmp_path / name, "--size", "32", "--workers", "1", "--anonymize",
                           "--salt", "pepper") == 0
    assert json.loads((tmp_path / "s1.subjects.json").read_text())["subjects"] == \
        json.loads((tmp_path / "s2.subjects.json").read_text())["subjects"]


def test_without_anonymize_paths_are_relative_to_their_source(tmp_path):
    src = _patient_named_sources(tmp_path)
    out = tmp_path / "shards"
    assert run_prepare(src, "--out", out, "--size", "32", "--workers", "1", "--no-anonymize") == 0
    assert str(tmp_path).encode() not in _every_byte(out)  # nothing absolute, anywhere
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["anonymized"] is False and manifest["roots"] == [src.name]
    paths = sorted(source["path"] for source in manifest["sources"])
    assert paths == sorted([f"{NAME}_{i}/anat/sub-{i:02d}_T1w.nii.gz" for i in range(3)]
                           + [f"slices/{NAME}/{NAME}_{i}.png" for i in range(4)])
    assert not (tmp_path / "shards.subjects.json").exists()


def test_dicom_is_anonymized_by_default(tmp_path):
    src = tmp_path / NAME
    for i in range(2):
        write_dicom_series(src / f"series{i}", brain(seed=i), patient_id=f"{NAME}-{i}", seed=i)
    out = tmp_path / "shards"
    assert run_prepare(src, "--out", out, "--size", "32", "--workers", "1") == 0
    assert NAME.encode() not in _every_byte(out)
    assert json.loads((out / "manifest.json").read_text())["anonymized"] is True
    assert set(json.loads((tmp_path / "shards.subjects.json").read_text())["subjects"]) == {f"{NAME}-0", f"{NAME}-1"}


def _bids(src: Path, n: int) -> list[Path]:
    return [write_nifti(src / f"sub-{i:02d}" / "anat" / f"sub-{i:02d}_T1w.nii.gz", brain(seed=i)) for i in range(n)]


def _corrupt(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_bad_input_never_empties_val_silently(tmp_path, capsys):
    # Three subjects: the one val would hold turns out to be bad; another takes its place.
    src = tmp_path / "three"
    files = _bids(src, 3)
    clean = tmp_path / "clean"
    assert run_prepare(src, "--out", clean, "--size", "32", "--workers", "1", "--val-frac", "0.3") == 0
    val = [s["path"] for s in json.loads((clean / "manifest.json").read_text())["sources"] if s["split"] == "val"]
    assert len(val) == 1
    _corrupt(src / val[0])
    out = tmp_path / "out"
    assert run_prepare(src, "--out", out, "--size", "32", "--workers", "1", "--val-frac", "0.3") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["val"] > 0 and manifest["bad_inputs"] == 1
    assert "val split is empty" not in capsys.readouterr().out

    # One more bad: one usable subject is left, so no val is possible, and the run says why.
    _corrupt(next(f for f in files if str(f.relative_to(src)) != val[0]))
    lonely = tmp_path / "lonely"
    assert run_prepare(src, "--out", lonely, "--size", "32", "--workers", "1", "--val-frac", "0.3") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "val split is empty" in line]
    assert lines == ["warning: the val split is empty: 2 bad input(s) (listed above) left 1 usable subject(s), "
                     "and val needs a subject of its own; add subjects, or use --split slab to hold out slices "
                     "of each volume"]
