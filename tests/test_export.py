"""`hpcgan sample`: synthetic slices marked as such, with provenance, audited against the training slices,
and shards that train again."""

from __future__ import annotations

import json

import nibabel as nib
import pytest
import torch
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
    monkeypatch.setattr(export, "_draw", lambda generator, n, seed, batch, labels, selection: real[:n])
    card = export.export(trained, tmp_path / "copies", n=4, fmt="png", seed=0)
    assert card["count"] == 0 and card["memorization"]["left_out"] == 4 * export.MAX_ROUNDS


class MeanIntensityD(torch.nn.Module):
    """A discriminator whose logit is known: the slice's mean intensity."""

    def forward(self, x, labels=None):
        return x.mean(dim=(1, 2, 3))


def test_d_filter_keeps_exactly_n_and_the_highest_scored(trained, tmp_path):
    from hpcgan.export import Selection, _draw, select
    from hpcgan.train.generator import load_generator

    generator = load_generator(trained)
    images, labels, _, record = select(generator, None, 10, 0, 64, None, None, Selection(d_quantile=0.5),
                                          MeanIntensityD())
    assert len(images) == 10 and labels is None
    d = record["discriminator"]
    assert (d["candidates"], d["kept"], d["acceptance_rate"]) == (20, 10, 0.5)
    candidates = _draw(generator, 20, 0, 64, None).mean(dim=(1, 2, 3))
    assert torch.equal(images.mean(dim=(1, 2, 3)).sort().values, candidates.sort().values[10:])
    assert d["lowest_kept_logit"] >= d["highest_dropped_logit"]

    out = tmp_path / "filtered"
    assert main(["sample", "--run", str(trained), "--n", "8", "--out", str(out), "--filter-d-quantile", "0.2",
                 "--truncation-z", "1.5"]) == 0
    card = json.loads((out / "datacard.json").read_text())
    assert card["count"] == 8 and len(list(out.glob("sample-*.png"))) == 8
    assert card["selection"]["discriminator"]["candidates"] == 10
    assert card["selection"]["discriminator"]["acceptance_rate"] == 0.8 and card["selection"]["truncation_z"] == 1.5
    assert "dropped (8 of 10 candidates kept" in (out / "DATACARD.md").read_text()


def test_truncation_reduces_sample_variance(trained):
    from hpcgan.config import ModelConfig
    from hpcgan.export import Selection, _draw, truncated_normal
    from hpcgan.models import build_generator
    from hpcgan.train.generator import load_generator

    z = truncated_normal(500, 8, 0.5, torch.Generator().manual_seed(0))
    assert z.abs().max() <= 0.5 and z.std() > 0.2
    dcgan = load_generator(trained)
    spread = [_draw(dcgan, 64, 0, 64, None, Selection(truncation_z=t)).std(dim=0).mean() for t in (0.0, 0.5)]
    assert spread[1] < 0.8 * spread[0], spread
    torch.manual_seed(0)
    stylegan = build_generator(ModelConfig(arch="stylegan2", nz=32, w_dim=32, mapping_layers=2, channel_base=256,
                                           channel_max=32)).eval()
    stylegan.mapping.w_avg.normal_()
    spread = [_draw(stylegan, 64, 0, 64, None, Selection(truncation=psi)).std(dim=0).mean() for psi in (1.0, 0.3)]
    assert spread[1] < 0.8 * spread[0], spread


class PhantomOrStripes(torch.nn.Module):
    """A 'conditional generator' that makes a stripe pattern (class 1's look) whenever z[0] > 0.5, whatever
    class is asked for: those slices are mislabeled."""

    nz = 4

    def forward(self, z, labels=None):
        from test_metrics import phantoms, stripes

        good, bad = phantoms(len(z), seed=int(z[0, 1] * 1e4) % 1000, size=64), stripes(len(z), seed=1, size=64)
        return torch.where((z[:, 0] > 0.5)[:, None, None, None], bad, good)


def test_class_check_drops_and_redraws_mislabeled_slices():
    from hpcgan.export import Selection, select, recognised
    from hpcgan.metrics.utility import ClassifierSettings, train_classifier
    from test_metrics import phantoms, stripes

    x = torch.cat([phantoms(64, seed=5, size=64), stripes(64, seed=6, size=64)])
    y = torch.cat([torch.zeros(64, dtype=torch.long), torch.ones(64, dtype=torch.long)])
    classifier = train_classifier(x, y, 2, seed=0, settings=ClassifierSettings(steps=60))
    probe = torch.cat([phantoms(4, seed=7, size=64), stripes(4, seed=8, size=64)])
    assert recognised(classifier, probe, torch.zeros(8, dtype=torch.long), 0.9).tolist() == [True] * 4 + [False] * 4

    wanted = torch.zeros(12, dtype=torch.long)
    images, labels, _, record = select(PhantomOrStripes(), wanted, 12, 0, 64, None, None,
                                          Selection(class_check=0.9), classifier=classifier)
    assert len(images) == 12 and labels.tolist() == [0] * 12
    assert record["class_check"]["dropped"] > 0
    assert recognised(classifier, images, labels, 0.9).all()


def test_selection_options_fail_in_one_line(trained, tmp_path, capsys):
    assert main(["sample", "--run", str(trained), "--out", str(tmp_path / "x"), "--truncation", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--truncation: a dcgan generator has no style space" in err and "Traceback" not in err
    assert main(["sample", "--run", str(trained), "--out", str(tmp_path / "y"), "--class-check", "0.8"]) == 2
    assert "the run is unconditional" in capsys.readouterr().err


def test_class_check_of_a_conditional_run_on_labelled_shards_is_recorded(tmp_path):
    from data_factories import make_shards

    make_shards(tmp_path / "shards", n_train=24, n_val=9, sizes=(64,), classes=("a", "b", "c"))
    run = tmp_path / "run"
    # balanced: the factory's manifest has no class counts, which class_balance=data would follow
    assert make_trainer(tmp_path / "shards", run, "model.conditional=true", "train.class_balance=balanced",
                        "train.steps=2").fit() == 0
    out = tmp_path / "checked"
    assert main(["sample", "--run", str(run), "--n", "6", "--class-check", "0.2", "--out", str(out)]) == 0
    card = json.loads((out / "datacard.json").read_text())
    check = card["selection"]["class_check"]
    assert check["threshold"] == 0.2 and check["dropped"] >= 0 and 0 <= check["heldout_accuracy"] <= 1
    assert "4 x (conv3x3 stride 2" in check["classifier"] and card["count"] <= 6
    assert "gave a probability below 0.2 dropped and redrawn" in (out / "DATACARD.md").read_text()
