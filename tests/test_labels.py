"""Classes per slice: `prepare --labels` from each source, stratified splits, bad tables, and every reader
returning each image's class (after a resume too)."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data_factories import brain, label_of, make_shards, run_prepare, slice_image, write_image, write_nifti
from hpcgan.config import DataConfig
from hpcgan.data import build_reader, load_labelled, shards
from hpcgan.data.split import assign_splits

READERS = ["memory", "webdataset", "dali"]


def written(shard_dir: Path) -> list[dict]:
    """Every written sample as {split, meta, cls}, from the tars themselves."""
    out = []
    for tar_path in sorted(shard_dir.glob("*-*.tar")):
        with tarfile.open(tar_path) as tar:
            members: dict[str, dict] = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                sample = members.setdefault(key, {"split": tar_path.name.split("-")[0]})
                data = tar.extractfile(m).read()
                if ext == "json":
                    sample["meta"] = json.loads(data)
                elif ext == "cls":
                    sample["cls"] = int(data)
            out += members.values()
    return out


def check_manifest(shard_dir: Path, source: str) -> list[str]:
    """The manifest's classes, source and counts agree with the samples written; returns the classes."""
    manifest = shards.read_manifest(shard_dir)
    classes = manifest["classes"]
    # A table is named by its file name only: where it lies may name a project or a patient.
    assert classes == sorted(classes) and manifest["label_source"] == (Path(source).name if source.endswith(".csv")
                                                                       else source)
    counts: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    for s in written(shard_dir):
        assert classes[s["cls"]] == s["meta"]["class"]
        counts[s["split"]][s["meta"]["class"]] = counts[s["split"]].get(s["meta"]["class"], 0) + 1
    assert manifest["class_counts"] == {split: dict(sorted(c.items())) for split, c in counts.items()}
    return classes


def prepare(*args: object) -> int:
    return run_prepare(*args, "--size", 16, "--workers", 1)


def test_folder_labels_are_stratified_and_part_of_the_fingerprint(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "kaggle", tmp_path / "out"
    for i in range(10):
        write_image(src / "no" / f"N{i}.png", slice_image(i, 24))
    for i in range(2):  # a rare class: an unstratified split may leave it out of one split
        write_image(src / "yes" / "deeper" / f"Y{i}.png", slice_image(20 + i, 24))
    assert prepare(src, "--out", out, "--val-frac", 0.25) == 0
    assert shards.read_manifest(out)["classes"] == [] and "class" not in written(out)[0]["meta"]
    capsys.readouterr()
    assert prepare(src, "--out", out, "--val-frac", 0.25, "--labels", "folder") == 0
    assert "up to date" not in capsys.readouterr().out  # the labels changed the fingerprint: rebuilt
    assert check_manifest(out, "folder") == ["no", "yes"]
    assert shards.read_manifest(out)["class_counts"]["val"] == {"no": 2, "yes": 1}
    assert shards.split_mismatch(out) is None
    assert prepare(src, "--out", out, "--val-frac", 0.25, "--labels", "folder") == 0
    assert "up to date" in capsys.readouterr().out


@pytest.mark.parametrize("seed", range(8))
def test_stratified_subject_split_keeps_every_class_in_both_splits(seed: int) -> None:
    strata = {f"s{i}": "common" for i in range(12)} | {f"r{i}": "rare" for i in range(2)} | {"alone": "single"}
    assigned = assign_splits(set(strata), 0.2, seed, strata)
    for cls in ("common", "rare"):
        assert {assigned[s] for s, c in strata.items() if c == cls} == {"train", "val"}
    assert assigned["alone"] == "train"  # one subject: it cannot be in both, train keeps it
    assert assign_splits(set(strata), 0.2, seed) == assign_splits(set(strata), 0.2, seed, None)
    assert "val" in assign_splits({"a", "b"}, 0.1, seed, {"a": "x", "b": "y"}).values()  # never an empty val


def test_table_by_path_relative_and_absolute(tmp_path: Path) -> None:
    src = tmp_path / "slices"
    files = [write_image(src / f"{i}.png", slice_image(i, 24)) for i in range(6)]
    rows = ["Path,Class,notes"] + [f"{f.name},{'tumour' if i % 2 else 'healthy'},x" for i, f in enumerate(files[:5])]
    rows.append(f"{files[5]},tumour,")  # absolute
    table = tmp_path / "labels.csv"
    table.write_text("\n".join(rows) + "\n\n")
    assert prepare(src, "--out", tmp_path / "out", "--val-frac", 0.34, "--labels", table) == 0
    assert check_manifest(tmp_path / "out", str(table)) == ["healthy", "tumour"]
    by_source = {s["meta"]["source_sha256"]: s["meta"]["class"] for s in written(tmp_path / "out")}
    assert sorted(by_source.values()) == ["healthy"] * 3 + ["tumour"] * 3


def bids(root: Path, subjects: int = 4) -> None:
    for n in range(1, subjects + 1):
        write_nifti(root / f"sub-{n:02d}" / "anat" / f"sub-{n:02d}_T1w.nii.gz", brain((16, 18, 14), seed=n))


def test_table_by_subject(tmp_path: Path) -> None:
    bids(tmp_path / "ds")
    table = tmp_path / "subjects.csv"
    table.write_text("subject,class\nsub-01,patient\nsub-02,control\nsub-03,patient\nsub-04,control\n"
                     "sub-04,control\n")  # a repeated row that agrees is fine
    assert prepare(tmp_path / "ds", "--out", tmp_path / "out", "--val-frac", 0.5, "--labels", table) == 0
    assert check_manifest(tmp_path / "out", str(table)) == ["control", "patient"]
    manifest = shards.read_manifest(tmp_path / "out")
    assert all(set(manifest["class_counts"][split]) == {"control", "patient"} for split in ("train", "val"))
    classes = {}
    for s in written(tmp_path / "out"):
        assert classes.setdefault(s["meta"]["subject"], s["meta"]["class"]) == s["meta"]["class"]
    assert sorted(classes.values()) == ["control", "control", "patient", "patient"]


def test_axis_and_contrast_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_nifti(tmp_path / "vol" / "sub-01_T1w.nii.gz", brain((20, 24, 18), seed=1))
    write_nifti(tmp_path / "vol" / "sub-01_FLAIR.nii.gz", brain((20, 24, 18), seed=2))
    assert prepare(tmp_path / "vol", "--out", tmp_path / "axis", "--split", "slab", "--labels", "axis") == 0
    assert check_manifest(tmp_path / "axis", "axis") == ["axial", "coronal", "sagittal"]
    assert all(s["meta"]["class"] == s["meta"]["axis"] for s in written(tmp_path / "axis"))
    manifest = shards.read_manifest(tmp_path / "axis")
    assert all(set(manifest["class_counts"][split]) == {"axial", "coronal", "sagittal"} for split in ("train", "val"))
    assert prepare(tmp_path / "vol", "--out", tmp_path / "contrast", "--split", "slab", "--labels", "contrast") == 0
    assert check_manifest(tmp_path / "contrast", "contrast") == ["FLAIR", "T1w"]
    assert all(s["meta"]["class"] == s["meta"]["contrast"] for s in written(tmp_path / "contrast"))
    capsys.readouterr()
    write_image(tmp_path / "img" / "a.png", slice_image(0))
    assert prepare(tmp_path / "img", "--out", tmp_path / "bad", "--labels", "axis") == 2
    assert "is a 2D image" in capsys.readouterr().err


@pytest.mark.parametrize("rows, row, says", [
    (["file,class", "a/0.png,x"], 1, "no path or subject column"),
    (["path,kind", "a/0.png,x"], 1, "no class column"),
    (["path,subject,class", "a/0.png,sub-01,x"], 1, "both path and subject columns"),
    (["path,class", "a/0.png,x", "b/1.png,y", "a/nope.png,x"], 4, "no input file a/nope.png"),
    (["path,class", "a/0.png,x", "b/1.png,"], 3, "empty class"),
    (["path,class", "a/0.png,x", "b/1.png,y", "a/0.png,y"], 4, "'y' here but 'x' in row 2"),
    (["path,class", "a/0.png,x"], None, "no row for"),
    (["subject,class", "sub-09,x"], 2, "unknown subject 'sub-09'"),
])
def test_bad_tables_stop_prepare_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], rows: list[str],
                                             row: int | None, says: str) -> None:
    src = tmp_path / "src"
    for i, folder in enumerate("ab"):
        write_image(src / folder / f"{i}.png", slice_image(i, 24))
    table = tmp_path / "labels.csv"
    table.write_text("\n".join(rows) + "\n")
    assert prepare(src, "--out", tmp_path / "out", "--subject-regex", r"^(\d)", "--labels", table) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: {table}: ") and says in err, err
    assert (f": row {row}: " in err) if row else (not re.search(r"row \d", err) and "b/1.png" in err), err
    assert not (tmp_path / "out" / shards.MANIFEST).exists()


def test_bad_label_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_image(tmp_path / "src" / "a.png", slice_image(0))
    assert prepare(tmp_path / "src", "--out", tmp_path / "out", "--labels", "colour") == 2
    assert "--labels colour: choose folder, axis, contrast" in capsys.readouterr().err
    assert prepare(tmp_path / "src", "--out", tmp_path / "out", "--labels", tmp_path / "missing.csv") == 2
    assert "no such file" in capsys.readouterr().err
    assert prepare(tmp_path / "src", "--out", tmp_path / "out", "--labels", "folder") == 2
    assert "not in a class folder" in capsys.readouterr().err


def source(path: Path, reader: str, *, rank: int = 0, world: int = 1, batch: int = 16):
    if reader == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = DataConfig(path=str(path), reader=reader, workers=1)
    return build_reader(cfg, seed=5, global_batch=batch, rank=rank, world=world, device=torch.device("cpu"))


def as_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x + 1) * 127.5).round().to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("labelled")
    make_shards(folder, n_train=101, n_val=7, classes=("a", "b", "c"))
    return folder


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_returns_each_images_class_and_resumes_with_it(labelled: Path, reader: str) -> None:
    for rank, world in ((0, 1), (1, 2)):
        src = source(labelled, reader, rank=rank, world=world)
        assert src.classes == ("a", "b", "c")
        for _ in range(src.batches_per_epoch + 2):  # into the second epoch
            images, labels = src.next_batch()
            assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
            assert labels.tolist() == [label_of(i, 3) for i in as_uint8(images)]
    first = source(labelled, reader)
    for _ in range(4):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    expected = [first.next_batch() for _ in range(4)]
    resumed = source(labelled, reader)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch()
        assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)


@pytest.mark.parametrize("reader", READERS)
def test_shards_without_classes_give_zeros(tmp_path: Path, reader: str) -> None:
    make_shards(tmp_path, n_train=32)
    src = source(tmp_path, reader)
    assert src.classes == () and torch.equal(src.next_batch().labels, torch.zeros(16, dtype=torch.int64))


def test_load_labelled(labelled: Path, tmp_path: Path) -> None:
    images, labels, classes = load_labelled(labelled, "val")
    assert images.shape == (7, 1, 16, 16) and classes == ("a", "b", "c")
    assert labels.tolist() == [label_of(i, 3) for i in images.numpy()]
    make_shards(tmp_path, n_train=8)
    images, labels, classes = load_labelled(tmp_path, "train")
    assert classes == () and torch.equal(labels, torch.zeros(8, dtype=torch.int64))


def test_image_folder_subfolders_are_classes(tmp_path: Path) -> None:
    for cls, value in (("no", 10), ("yes", 200)):
        for i in range(4):
            write_image(tmp_path / "data" / cls / f"{i}.png", np.full((8, 8), value + i, np.uint8))
    src = source(tmp_path / "data", "memory", batch=8)
    assert src.classes == ("no", "yes")
    images, labels = src.next_batch()
    assert labels.tolist() == [int(v >= 200) for v in as_uint8(images)[:, 0, 0, 0]]
    write_image(tmp_path / "data" / "loose.png", np.full((8, 8), 50, np.uint8))
    assert source(tmp_path / "data", "memory", batch=8).classes == ()


def test_written_shard_sets_carry_classes(tmp_path: Path) -> None:
    images = np.stack([np.full((8, 8), 10 * i, np.uint8) for i in range(6)])
    manifest = shards.write_shard_set(tmp_path, images, [{}] * 6, {}, shard_size=4, labels=[1, 0, 1, 1, 0, 1],
                                      classes=("coronal", "sagittal"))
    assert manifest["class_counts"]["train"] == {"coronal": 2, "sagittal": 4}
    loaded, labels, classes = load_labelled(tmp_path, "train")
    assert classes == ("coronal", "sagittal") and labels.tolist() == [1, 0, 1, 1, 0, 1]
    assert torch.equal(loaded[:, 0].contiguous(), torch.from_numpy(images))
    with pytest.raises(ValueError, match="as many labels"):
        shards.write_shard_set(tmp_path / "bad", images, [{}] * 6, {}, labels=[0, 2, 0, 0, 0, 0], classes=("a", "b"))
