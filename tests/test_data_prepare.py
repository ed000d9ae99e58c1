"""`hpcgan prepare`: every input kind, the subject and slab splits, privacy, resume, and bad inputs."""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from data_factories import (SECRETS, brain, dicom_affine, run_prepare, slice_image, tree_digest,
                            write_dicom_series, write_dicom_without_pixels, write_image, write_nifti)
from hpcgan.data import load_split, prepare, shards


def samples(shard_dir: Path, split: str | None = None) -> list[dict]:
    """Every sample of a shard folder as {key, json meta, pngs: {ext: bytes}}, in shard order."""
    out = []
    for tar_path in sorted(shard_dir.glob(f"{split or '*'}-*.tar")):
        with tarfile.open(tar_path) as tar:
            members: dict[str, dict] = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {"key": key, "split": tar_path.name.split("-")[0], "pngs": {}})
                data = tar.extractfile(m).read()
                if ext == "json":
                    members[key]["meta"] = json.loads(data)
                else:
                    members[key]["pngs"][ext] = data
            out += members.values()
    return out


def test_image_folder_with_class_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "kaggle"
    for i in range(6):
        write_image(src / "yes" / f"Y{i}.png", slice_image(i))
        write_image(src / "no" / f"N{i}.jpg", np.stack([slice_image(10 + i)] * 3, axis=-1))  # RGB JPEG
    write_image(src / "no" / "N9.tif", slice_image(30))
    (src / "README.txt").write_text("not an image")
    assert run_prepare(src, "--out", tmp_path / "out", "--size", 32, "--val-frac", 0.25, "--workers", 1) == 0
    out = capsys.readouterr().out
    assert "split is per file" in out and "1 other files ignored" in out
    manifest = shards.read_manifest(tmp_path / "out")
    assert manifest["counts"] == {"train": 10, "val": 3} and manifest["split"]["unit"] == "file"
    found = samples(tmp_path / "out")
    assert {s["meta"]["label"] for s in found} == {"yes", "no"}
    assert {s["meta"]["kind"] for s in found} == {"image"} and {s["meta"]["axis"] for s in found} == {"2d"}
    for s in found:
        image = Image.open(io.BytesIO(s["pngs"]["32.png"]))
        assert image.mode == "L" and image.size == (32, 32)
    assert all((tmp_path / "out" / r["index"]).is_file() for r in manifest["shards"])


def test_subject_regex_keeps_a_patients_slices_together(tmp_path: Path) -> None:
    src = tmp_path / "slices"
    for patient in range(8):
        for n in range(3):
            write_image(src / f"{patient:02d}_{n}.png", slice_image(patient * 3 + n))
    assert run_prepare(src, "--out", tmp_path / "out", "--size", 16, "--val-frac", 0.25,
                       "--subject-regex", r"^(\d+)_", "--workers", 1) == 0
    manifest = shards.read_manifest(tmp_path / "out")
    assert manifest["split"]["unit"] == "subject" and manifest["subjects"] == {"train": 6, "val": 2}
    by_subject: dict[str, set[str]] = {}
    for s in samples(tmp_path / "out"):
        by_subject.setdefault(s["meta"]["subject"], set()).add(s["split"])
    assert len(by_subject) == 8 and all(len(splits) == 1 for splits in by_subject.values())


def test_nifti_volumes_3d_and_4d_and_reorientation(tmp_path: Path) -> None:
    vol = brain((20, 24, 18))
    write_nifti(tmp_path / "ras" / "a.nii.gz", vol)
    # The same brain stored left-right and anterior-posterior flipped, with an affine saying so:
    flipped = np.diag([-1.0, -1.0, 1.0, 1.0])
    flipped[:2, 3] = [19, 23]
    write_nifti(tmp_path / "lps" / "a.nii", vol[::-1, ::-1, :].copy(), affine=flipped)
    write_nifti(tmp_path / "4d" / "b.nii.gz", np.stack([brain(seed=1), brain(seed=2)], axis=-1))
    for name in ("ras", "lps"):
        assert run_prepare(tmp_path / name, "--out", tmp_path / f"out-{name}", "--size", 16,
                           "--val-frac", 0, "--workers", 1) == 0
    ras, lps = samples(tmp_path / "out-ras"), samples(tmp_path / "out-lps")
    assert sorted(s["pngs"]["16.png"] for s in ras) == sorted(s["pngs"]["16.png"] for s in lps)
    assert {s["meta"]["axis"] for s in ras} == {"axial", "coronal", "sagittal"}

    assert run_prepare(tmp_path / "4d", "--out", tmp_path / "out-4d", "--size", 16, "--axes", "axial",
                       "--val-frac", 0, "--workers", 1) == 0
    four = samples(tmp_path / "out-4d")
    assert {s["meta"]["axis"] for s in four} == {"axial"}
    assert {s["meta"]["volume"].rsplit("-", 1)[1] for s in four} == {"t000", "t001"}


def test_anisotropic_voxels_keep_their_physical_aspect(tmp_path: Path) -> None:
    # A 20 mm x 20 mm x 20 mm cube sampled with 4 mm slices: coronal/sagittal slices must stay square.
    vol = np.zeros((24, 24, 8), np.float32)
    vol[2:22, 2:22, 1:6] = 100.0  # 20 x 20 voxels of 1 mm, 5 slices of 4 mm
    write_nifti(tmp_path / "cube.nii.gz", vol, zooms=(1.0, 1.0, 4.0))
    assert run_prepare(tmp_path / "cube.nii.gz", "--out", tmp_path / "out", "--size", 20, "--axes", "coronal",
                       "--crop", "none", "--min-foreground", 0.2, "--val-frac", 0, "--workers", 1) == 0
    image = np.asarray(Image.open(io.BytesIO(samples(tmp_path / "out")[0]["pngs"]["20.png"])))
    rows, cols = np.flatnonzero(image.max(axis=1) > 128), np.flatnonzero(image.max(axis=0) > 128)
    assert abs(len(rows) - len(cols)) <= 1  # 20 mm tall (5 x 4 mm) as wide as 20 mm (20 x 1 mm)


def test_dicom_series_is_ordered_by_position_like_the_same_nifti(tmp_path: Path) -> None:
    vol = brain((20, 24, 12)) * 2 - 100  # exactly representable with slope 2, intercept -100
    spacing, origin = (1.0, 1.0, 2.0), (-10.0, -12.0, 5.0)
    write_dicom_series(tmp_path / "dicom" / "series1", vol, spacing=spacing, origin=origin)
    write_nifti(tmp_path / "nifti" / "same.nii.gz", vol, affine=dicom_affine(spacing, origin))
    for name in ("dicom", "nifti"):
        assert run_prepare(tmp_path / name, "--out", tmp_path / f"out-{name}", "--size", 16, "--val-frac", 0,
                           "--workers", 1) == 0
    dcm, nii = samples(tmp_path / "out-dicom"), samples(tmp_path / "out-nifti")
    assert len(dcm) > 20
    assert sorted((s["meta"]["axis"], s["meta"]["slice"], s["pngs"]["16.png"]) for s in dcm) == \
        sorted((s["meta"]["axis"], s["meta"]["slice"], s["pngs"]["16.png"]) for s in nii)
    assert {s["meta"]["modality"] for s in dcm} == {"MR"}
    assert all("label" not in s["meta"] for s in dcm)  # DICOM is anonymized by default: no folder names


def test_mixed_kinds_in_one_run(tmp_path: Path) -> None:
    write_nifti(tmp_path / "src" / "vol.nii.gz", brain(seed=3))
    write_dicom_series(tmp_path / "src" / "dcm", brain((20, 24, 10), seed=4))
    write_image(tmp_path / "src" / "img" / "x.png", slice_image(5))
    assert run_prepare(tmp_path / "src", "--out", tmp_path / "out", "--size", 16, "--workers", 1) == 0
    assert {s["meta"]["kind"] for s in samples(tmp_path / "out")} == {"nifti", "dicom", "image"}


def test_bids_split_is_by_subject_and_deterministic(tmp_path: Path) -> None:
    bids = tmp_path / "bids"
    for n in range(1, 11):
        for suffix, seed in (("T1w", n), ("T2w", 100 + n)):
            write_nifti(bids / f"sub-{n:02d}" / "anat" / f"sub-{n:02d}_{suffix}.nii.gz", brain((12, 14, 10), seed=seed))
    args = ("--size", 16, "--axes", "axial", "--val-frac", 0.3, "--shard-size", 25)
    assert run_prepare(bids, "--out", tmp_path / "a", *args, "--workers", 1) == 0
    assert run_prepare(bids, "--out", tmp_path / "b", *args, "--workers", 2) == 0  # parallel, same bytes
    assert run_prepare(bids, "--out", tmp_path / "c", *args, "--workers", 1, "--seed", 7) == 0
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")

    def split_of_subject(out: Path) -> dict[str, str]:
        manifest = shards.read_manifest(out)
        result: dict[str, str] = {}
        for source in manifest["sources"]:
            subject = re.search(r"sub-\d+", source["path"]).group(0)
            assert result.setdefault(subject, source["split"]) == source["split"], f"{subject} in both splits"
        return result

    a, c = split_of_subject(tmp_path / "a"), split_of_subject(tmp_path / "c")
    assert sorted(a.values()).count("val") == 3 and a != c
    assert shards.read_manifest(tmp_path / "a")["subjects"] == {"train": 7, "val": 3}
    assert {s["meta"]["label"] for s in samples(tmp_path / "a")} == {""}  # anat/ is not a class


def test_no_dicom_header_value_reaches_shards_manifest_or_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "export"
    paths = write_dicom_series(src / "s1", brain((16, 18, 8)))
    write_dicom_without_pixels(src / "report.dcm")
    (src / "broken.dcm").write_bytes(paths[0].read_bytes()[:400])  # header cut off mid-way
    odd = pydicom.dcmread(paths[4])  # a middle slice with invalid values, which pydicom's validation would quote back
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        odd.SeriesInstanceUID, odd.PatientID = "1.2.INVALIDSECRETUID", "LONGSECRETPID" * 6
        odd.PatientBirthDate, odd.Modality = "SECRETBIRTHDAY", "SECRETMOD"
        odd.save_as(src / "odd.dcm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_prepare(src, "--out", tmp_path / "out", "--size", 16, "--val-frac", 0, "--workers", 1) == 0
    logged = capsys.readouterr()
    text = logged.out + logged.err + caplog.text + "".join(str(w.message) for w in caught)
    assert "report.dcm: DICOM without pixel data" in text
    header = pydicom.dcmread(paths[0])
    secrets = list(SECRETS.values()) + [header.SeriesInstanceUID, header.StudyInstanceUID, header.SOPInstanceUID]
    secrets += [part for v in SECRETS.values() for part in re.split(r"[\^ ]", v) if len(part) >= 6]
    secrets += ["INVALIDSECRETUID", "LONGSECRETPID", "SECRETBIRTHDAY", "SECRETMOD"]
    blobs = [text.encode()] + [p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()]
    for secret in secrets:
        for blob in blobs:
            assert secret.lower().encode() not in blob.lower(), f"{secret!r} leaked"
    manifest = shards.read_manifest(tmp_path / "out")
    assert manifest["counts"]["train"] > 0 and manifest["volumes"]["train"] == 2  # the odd one is used too


def test_resume_after_interruptions_and_noop_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    for n in range(4):
        write_nifti(tmp_path / "src" / f"v{n}.nii.gz", brain((12, 14, 10), seed=n))
    args = (tmp_path / "src", "--out", tmp_path / "out", "--size", 16, "--shard-size", 10, "--val-frac", 0.25,
            "--workers", 1)
    assert run_prepare(tmp_path / "src", "--out", tmp_path / "reference", *args[3:]) == 0
    processed: list[str] = []
    real_slices, real_close = prepare._slices, shards.ShardWriter.close

    def slices_then_stop(volume, settings):  # dies on the third volume
        if len(processed) == 2:
            raise KeyboardInterrupt
        processed.append(volume.volume_id)
        return real_slices(volume, settings)

    monkeypatch.setattr(prepare, "_slices", slices_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(*args)
    assert not (tmp_path / "out" / "manifest.json").exists()

    written: list[str] = []

    def close_then_stop(writer):  # dies after two shards
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(writer.path.name)
        return real_close(writer)

    monkeypatch.setattr(prepare, "_slices", lambda v, s: (processed.append(v.volume_id), real_slices(v, s))[1])
    monkeypatch.setattr(shards.ShardWriter, "close", close_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(*args)
    assert len(processed) == 4  # the two done units were not processed again
    done = {name: (tmp_path / "out" / name).stat().st_mtime_ns for name in written}

    monkeypatch.setattr(shards.ShardWriter, "close", real_close)
    capsys.readouterr()
    assert run_prepare(*args) == 0
    assert "resuming" in capsys.readouterr().out
    assert len(processed) == 4 and all((tmp_path / "out" / n).stat().st_mtime_ns == t for n, t in done.items())
    assert tree_digest(tmp_path / "out") == tree_digest(tmp_path / "reference")

    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir() if p.is_file()}
    assert run_prepare(*args) == 0
    assert "up to date" in capsys.readouterr().out and len(processed) == 4
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir() if p.is_file()}

    assert run_prepare(*args[:-2], "--workers", 1, "--seed", 1) == 0  # other settings: rebuilt in place
    assert tree_digest(tmp_path / "out") != tree_digest(tmp_path / "reference")
    assert not list((tmp_path / "out").glob("*.part"))


def test_bad_inputs_are_reported_and_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    write_image(src / "good" / "a.png", slice_image(1))
    write_nifti(src / "good" / "v.nii.gz", brain(seed=2))
    (src / "bad").mkdir()
    (src / "bad" / "corrupt.png").write_bytes((src / "good" / "a.png").read_bytes()[:60])
    full = gzip.compress(write_nifti(tmp_path / "tmp.nii", brain(seed=5)).read_bytes())
    (src / "bad" / "truncated.nii.gz").write_bytes(full[: len(full) // 2])
    write_dicom_without_pixels(src / "bad" / "nopixels.dcm")
    write_nifti(src / "bad" / "flat.nii.gz", brain((20, 24, 1))[:, :, 0])
    (tmp_path / "empty").mkdir()
    assert run_prepare(src, tmp_path / "empty", "--out", tmp_path / "out", "--size", 16, "--val-frac", 0,
                       "--workers", 1) == 0
    out = capsys.readouterr().out
    expected = {
        "corrupt.png": "cannot decode image",
        "truncated.nii.gz": "truncated or corrupt NIfTI",
        "nopixels.dcm": "DICOM without pixel data",
        "flat.nii.gz": "2D image stored as a volume",
        "empty": "no PNG/JPG/TIFF, NIfTI or DICOM files found",
    }
    lines = [line for line in out.splitlines() if line.startswith("bad input:")]
    assert len(lines) == len(expected)
    for name, reason in expected.items():
        assert any(name in line and reason in line for line in lines), (name, out)
    assert "5 bad inputs" in out
    kinds = {s["meta"]["kind"] for s in samples(tmp_path / "out")}
    assert kinds == {"image", "nifti"}

    assert run_prepare(src, "--out", tmp_path / "strict", "--size", 16, "--workers", 1, "--strict") == 1
    assert not (tmp_path / "strict" / "manifest.json").exists()
    assert run_prepare(src / "bad", tmp_path / "empty", "--out", tmp_path / "none", "--workers", 1) == 1
    assert "nothing usable" in capsys.readouterr().out or not (tmp_path / "none" / "manifest.json").exists()


def test_several_sizes_and_16_bit(tmp_path: Path) -> None:
    write_nifti(tmp_path / "v.nii.gz", brain(seed=1))
    assert run_prepare(tmp_path / "v.nii.gz", "--out", tmp_path / "out", "--size", "16,32", "--bit-depth", 16,
                       "--val-frac", 0, "--workers", 1) == 0
    first = samples(tmp_path / "out")[0]["pngs"]
    assert set(first) == {"16.png", "32.png"}
    wide = np.asarray(Image.open(io.BytesIO(first["32.png"])))
    assert wide.dtype == np.uint16 and wide.shape == (32, 32)
    images = load_split(tmp_path / "out", "train", size=32)
    assert images.shape[1:] == (1, 32, 32)
    np.testing.assert_array_equal(images[0, 0].numpy(), np.round(wide / 257).astype(np.uint8))
    with pytest.raises(Exception, match=r"sizes \[16, 32\], not 64"):
        load_split(tmp_path / "out", "train", size=64)


def test_cli_registers_prepare(tmp_path: Path) -> None:
    cli = pytest.importorskip("hpcgan.cli", reason="hpcgan/cli.py not written yet")
    write_image(tmp_path / "src" / "a.png", slice_image(1))
    assert cli.main(["prepare", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--size", "16",
                     "--workers", "1"]) in (0, None)
    assert shards.read_manifest(tmp_path / "out")["counts"]["train"] == 1


def split_slices(shard_dir: Path) -> dict[tuple[str, str], dict[str, set[int]]]:
    """(volume, axis) -> split -> slice indices, from the samples themselves."""
    out: dict[tuple[str, str], dict[str, set[int]]] = {}
    for s in samples(shard_dir):
        meta = s["meta"]
        out.setdefault((meta["volume"], meta["axis"]), {"train": set(), "val": set()})[s["split"]].add(meta["slice"])
    return out


def test_slab_split_holds_out_spread_blocks_with_gaps(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shapes = {"a_T1w.nii.gz": (36, 40, 32), "a_T2w.nii.gz": (36, 40, 32), "b_T1w.nii.gz": (30, 34, 28)}
    for seed, (name, shape) in enumerate(shapes.items()):
        write_nifti(src / name, brain(shape, seed=seed))
    assert run_prepare(src, "--out", tmp_path / "slab", "--size", 16, "--split", "slab", "--val-frac", 0.2,
                       "--slab-gap", 2, "--slabs", 2, "--workers", 1) == 0
    assert run_prepare(src, "--out", tmp_path / "all", "--size", 16, "--split", "slab", "--val-frac", 0,
                       "--workers", 1) == 0
    kept = {key: roles["train"] for key, roles in split_slices(tmp_path / "all").items()}
    assert shards.read_manifest(tmp_path / "all")["gap_slices"] == 0

    manifest = shards.read_manifest(tmp_path / "slab")
    split = manifest["split"]
    assert (split["method"], split["unit"], split["slab_gap"], split["slabs"], split["val_frac"], split["seed"]) == \
        ("slab", "slab", 2, 2, 0.2, 0)
    assert {s["split"] for s in manifest["sources"]} == {"slab"}
    assert manifest["contrasts"]["train"].keys() == manifest["contrasts"]["val"].keys() == {"T1w", "T2w"}
    slabs = {(g["axis"], g["length"]): [range(*r) for r in g["val"]] for g in split["val_slabs"]}
    assert len(slabs) == 6 and all(len(ranges) == 2 for ranges in slabs.values())  # two grids, three axes
    shape_of = {s["volume"]: shapes[Path(s["path"]).name] for s in manifest["sources"]}
    dim = {"sagittal": 0, "coronal": 1, "axial": 2}
    by_volume = split_slices(tmp_path / "slab")
    assert by_volume.keys() == kept.keys()
    left_out = 0
    for (volume, axis), roles in by_volume.items():
        train, val = roles["train"], roles["val"]
        ranges = slabs[axis, shape_of[volume][dim[axis]]]  # one grid's volumes share their slabs
        assert val and train and not train & val
        assert min(abs(v - t) for v in val for t in train) > 2, (volume, axis)  # the gap holds
        assert val == {i for i in kept[volume, axis] if any(i in r for r in ranges)}  # whole blocks
        assert ranges[1].start - ranges[0].stop > 2 * 2  # two blocks apart, not one at one end
        gap = kept[volume, axis] - train - val
        assert all(any(r.start - 2 <= i < r.stop + 2 for r in ranges) for i in gap)
        left_out += len(gap)
    assert left_out == manifest["gap_slices"] > 0
    assert sum(manifest["counts"].values()) + left_out == sum(len(k) for k in kept.values())


def test_slab_split_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    for n in range(2):
        write_nifti(tmp_path / "src" / f"v{n}.nii.gz", brain((40, 44, 36), seed=n))
    args = ("--size", 16, "--split", "slab", "--val-frac", 0.15, "--shard-size", 30)
    assert run_prepare(tmp_path / "src", "--out", tmp_path / "a", *args, "--workers", 1) == 0
    assert run_prepare(tmp_path / "src", "--out", tmp_path / "b", *args, "--workers", 2) == 0
    assert run_prepare(tmp_path / "src", "--out", tmp_path / "c", *args, "--workers", 1, "--seed", 1) == 0
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    a, c = split_slices(tmp_path / "a"), split_slices(tmp_path / "c")
    assert a.keys() == c.keys() and any(a[k]["val"] != c[k]["val"] for k in a)


def test_split_mismatch_warns_when_val_holds_another_contrast_or_kind(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_nifti(src / "mni_t1.nii.gz", brain((24, 28, 22), seed=1))
    write_nifti(src / "mni_wm.nii.gz", brain((24, 28, 22), seed=2))
    assert run_prepare(src, "--out", tmp_path / "by-volume", "--size", 16, "--val-frac", 0.5, "--workers", 1) == 0
    warning = shards.split_mismatch(tmp_path / "by-volume")
    assert warning is not None and "\n" not in warning and str(tmp_path / "by-volume") in warning
    assert "in contrast (train" in warning and "T1w" in warning and "WM" in warning and "in source kind" not in warning
    assert run_prepare(src, "--out", tmp_path / "slab", "--size", 16, "--split", "slab", "--val-frac", 0.2,
                       "--slab-gap", 1, "--workers", 1) == 0
    assert shards.split_mismatch(tmp_path / "slab") is None
    contrasts = {s["meta"]["contrast"] for s in samples(tmp_path / "slab", "val")}
    assert contrasts == {s["meta"]["contrast"] for s in samples(tmp_path / "slab", "train")} == {"T1w", "WM"}

    same = tmp_path / "same"
    write_nifti(same / "sub-01_T1w.nii.gz", brain((16, 18, 14), seed=3))
    write_nifti(same / "sub-02_T1w.nii.gz", brain((16, 18, 14), seed=4))
    assert run_prepare(same, "--out", tmp_path / "same-out", "--size", 16, "--val-frac", 0.5, "--workers", 1) == 0
    assert shards.read_manifest(tmp_path / "same-out")["counts"]["val"] > 0
    assert shards.split_mismatch(tmp_path / "same-out") is None

    kinds = tmp_path / "kinds"
    write_nifti(kinds / "x_T1w.nii.gz", brain((16, 18, 14), seed=5))
    write_image(kinds / "y_T1w.png", slice_image(6))
    assert run_prepare(kinds, "--out", tmp_path / "kinds-out", "--size", 16, "--val-frac", 0.5, "--workers", 1) == 0
    warning = shards.split_mismatch(tmp_path / "kinds-out")
    assert warning is not None and "in source kind (train" in warning and "in contrast" not in warning


def test_slab_split_bad_options_and_inputs_without_slices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_nifti(tmp_path / "vol" / "v.nii.gz", brain((20, 24, 18), seed=1))
    for option, value in (("--slab-gap", -1), ("--slabs", 0), ("--val-frac", 1.0)):
        assert run_prepare(tmp_path / "vol", "--out", tmp_path / "out", "--split", "slab", option, value) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"error: {option} "), err
    with pytest.raises(SystemExit):
        run_prepare(tmp_path / "vol", "--out", tmp_path / "out", "--split", "volume")
    assert "invalid choice: 'volume'" in capsys.readouterr().err

    for i in range(4):
        write_image(tmp_path / "images" / f"{i}.png", slice_image(i))
    assert run_prepare(tmp_path / "images", "--out", tmp_path / "out", "--split", "slab", "--workers", 1) == 2
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "--split slab" in errors[0] and "2D images" in errors[0]
    assert "--split subject" in errors[0] and not (tmp_path / "out" / "manifest.json").exists()

    # Mixed: the images are split by subject; an axis too short for a slab and its gaps goes to train.
    write_nifti(tmp_path / "images" / "thin.nii.gz", brain((30, 34, 6), seed=2))
    assert run_prepare(tmp_path / "images", "--out", tmp_path / "mixed", "--size", 16, "--split", "slab",
                       "--val-frac", 0.5, "--slab-gap", 3, "--workers", 1) == 0
    out = capsys.readouterr().out
    assert "4 2D images have no neighbouring slices" in out and "too short for a val slab" in out
    manifest = shards.read_manifest(tmp_path / "mixed")
    assert {s["split"] for s in manifest["sources"] if s["kind"] == "image"} == {"train", "val"}
    assert [g["val"] for g in manifest["split"]["val_slabs"] if g["axis"] == "axial"] == [[]]
    thin = {axis: {split for split, indices in roles.items() if indices}
            for (_, axis), roles in split_slices(tmp_path / "mixed").items() if axis != "2d"}
    assert thin["axial"] == {"train"} and thin["coronal"] == {"train", "val"}


def test_quickstart_compares_like_with_like(tmp_path: Path) -> None:
    pytest.importorskip("nilearn")
    from hpcgan.data.quickstart import quickstart_shards

    manifest = shards.read_manifest(quickstart_shards(tmp_path / "qs"))
    assert manifest["split"]["method"] == "slab" and manifest["counts"]["train"] >= 700
    assert manifest["contrasts"]["train"].keys() == manifest["contrasts"]["val"].keys() == {"T1w", "GM", "WM"}
    assert shards.split_mismatch(tmp_path / "qs") is None
