"""`hpcgan sample`: synthetic slices marked as such, with provenance, audited against the training slices,
and shards that train again."""

from __future__ import annotations

import json

import nibabel as nib
import pytest
from PIL import Image

from hpcgan.cli import main
from hpcgan.data import shards

from helpers import make_trainer, train_args


@pytest.fixture(scope="module")
def trained(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    assert make_trainer(image_folder, out, "train.steps=4").fit() == 0
    return out


def test_png_export_is_marked_and_carries_a_data_card(trained, tmp_path):
    out = tmp_path / "png"
    assert main(["sample", "--run", str(trained), "--n", "6", "--out", str(out), "--seed", "3"]) == 0
    pngs = sorted(out.glob("sample-*.png"))
    assert len(pngs) == 6
    assert Image.open(pngs[0]).text["hpcgan:synthetic"] == "true"
    assert "SYNTHETIC" in Image.open(pngs[0]).text["Description"]
    card = json.loads((out / "datacard.json").read_text())
    assert card["synthetic"] and card["count"] == 6 and card["step"] == 4 and card["seed"] == 3 and card["ema"]
    assert card["memorization"]["audited"] and card["memorization"]["left_out"] >= 0
    assert len(card["config_sha256"]) == 64 and card["source_data"]["fingerprint"]
    assert "Every image in this folder is synthetic" in (out / "DATACARD.md").read_text()


def test_shard_export_trains_again_and_nifti_is_marked(trained, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["sample", "--run", str(trained), "--n", "16", "--format", "shards", "--out", str(out)]) == 0
    manifest = shards.read_manifest(out)
    assert manifest["synthetic"]["synthetic"] and manifest["counts"]["train"] == 16
    retrained = tmp_path / "again"
    assert main(train_args(out, retrained, "train.steps=2")) == 0
    nifti = tmp_path / "nifti"
    assert main(["sample", "--run", str(trained), "--n", "5", "--format", "nifti", "--out", str(nifti)]) == 0
    volume = nib.load(nifti / "synthetic.nii.gz")
    assert volume.shape == (64, 64, 5) and b"SYNTHETIC" in volume.header["descrip"].tobytes()


def test_copied_training_slices_are_left_out(trained, image_folder, tmp_path, monkeypatch):
    """A 'generator' that returns training slices: every draw is flagged, so nothing copied is exported."""
    import hpcgan.export as export
    from hpcgan.data import load_real
    from hpcgan.data.pixels import to_unit

    real = to_unit(load_real(image_folder))
    monkeypatch.setattr(export, "_draw", lambda generator, n, seed, batch, labels: real[:n])
    card = export.export(trained, tmp_path / "copies", n=4, fmt="png", seed=0)
    assert card["count"] == 0 and card["memorization"]["left_out"] == 4 * export.MAX_ROUNDS
