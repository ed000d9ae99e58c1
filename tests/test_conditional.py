"""Conditional generation: class-conditional G and projection D for every arch, trained with labels under
resume, bf16 and DDP, sampled by class, and exported by class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from hpcgan.cli import main
from hpcgan.config import ConfigError, build_config
from hpcgan.data import shards
from hpcgan.models import build_models
from hpcgan.train.conditioning import allocate
from hpcgan.train.samples import grid_labels

from helpers import (TINY, assert_identical, ddp_report, final_weights, make_trainer, train_args,
                     write_image_folder)
from test_archs import FASTGAN, SMALL_DATA, STYLEGAN2

CLASSES = ("axial", "coronal", "sagittal")
MODELS = {
    "dcgan": ["model.ngf=8", "model.ndf=8"],
    "dcgan-sn": ["model.ngf=8", "model.ndf=8", "model.spectral_norm=true"],
    "stylegan2": STYLEGAN2,
    "fastgan": FASTGAN,
}
CONDITIONAL = ["model.conditional=true"]


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory) -> Path:
    """An ImageFolder tree: one subfolder of 16 slices per class."""
    root = tmp_path_factory.mktemp("labelled") / "slices"
    for i, name in enumerate(CLASSES):
        write_image_folder(root / name, n=16, seed=10 + i)
    return root


def built(sets: list[str], classes: int):
    cfg = build_config(overrides=[*sets, f"model.conditional={classes}"]).model
    torch.manual_seed(0)
    return build_models(cfg)


@pytest.mark.parametrize("arch", list(MODELS))
def test_every_arch_conditions_g_and_d_on_the_class(arch):
    G, D = built(MODELS[arch], 3)
    assert G.num_classes == 3
    z, y = torch.randn(6, G.nz), torch.tensor([0, 1, 2, 0, 1, 2])
    D(G(z, y), y)  # a first training pass: spectral norm's power iteration, BatchNorm statistics
    G.eval(), D.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        images = G(z, y)
        torch.manual_seed(1)
        other = G(z, (y + 1) % 3)
        assert images.shape == (6, 1, 64, 64)
        assert (images - other).abs().amax(dim=(1, 2, 3)).min() > 0  # every image changes with its class
        assert (D(images, y) - D(images, (y + 1) % 3)).abs().min() > 0


SN_PROJECTION = {"project.parametrizations.weight.original", "project.parametrizations.weight.0._u",
                 "project.parametrizations.weight.0._v"}
# Per arch: what conditioning adds to G and D, and the one G weight whose input widens to take the class.
ADDED = {
    "dcgan": ({"embed.weight"}, {"project.weight"}, "net.0.weight"),
    "dcgan-sn": ({"embed.weight"}, SN_PROJECTION, "net.0.weight"),
    "stylegan2": ({"mapping.embed.weight"}, {"project.weight"}, "mapping.layers.0.weight"),
    "fastgan": ({"embed.weight"}, SN_PROJECTION, "initial.0.weight"),
}


@pytest.mark.parametrize("arch", list(MODELS))
def test_unconditional_nets_are_unchanged_and_conditional_ones_only_add_class_embeddings(arch):
    G0, D0 = built(MODELS[arch], 0)
    G, D = built(MODELS[arch], 3)
    added_g, added_d, widened = ADDED[arch]
    for plain, cond, added in ((G0, G, added_g), (D0, D, added_d)):
        assert plain.num_classes == 0
        before, after = plain.state_dict(), cond.state_dict()
        assert set(after) - set(before) == added and set(before) <= set(after)
        assert [k for k in before if before[k].shape != after[k].shape] == ([widened] if plain is G0 else [])
    for a, b in zip(built(MODELS[arch], "false"), (G0, D0)):  # false and 0: the same unconditional nets
        assert_identical(a.state_dict(), b.state_dict())


def test_grid_rows_show_every_class_and_allocation_follows_the_weights():
    rows = grid_labels(64, 3).view(8, 8)
    assert rows[:, 0].tolist() == [0, 1, 2, 0, 1, 2, 0, 1] and (rows == rows[:, :1]).all()
    assert set(grid_labels(64, 20).tolist()) == set(range(20))  # more classes than rows: every class still shown
    assert allocate(10, [60, 40]).tolist() == [0] * 6 + [1] * 4
    assert torch.bincount(allocate(7, [0, 1, 1]), minlength=3).tolist() == [0, 4, 3]


def test_conditional_and_class_balance_are_checked_config_values():
    parsed = {v: build_config(overrides=[f"model.conditional={v}"]).model.conditional for v in ("true", "3", "false")}
    assert parsed == {"true": True, "3": 3, "false": False}
    for value, message in (("-1", "must be >= 0"), ("2.5", "expected int or bool"),
                           ("true", "taken from the data when training starts")):
        with pytest.raises(ConfigError, match=message):
            build_config(overrides=[f"model.conditional={value}"]).model.num_classes
    with pytest.raises(ConfigError, match="train.class_balance='even'"):
        build_config(overrides=["train.class_balance=even"])


def test_conditional_needs_labelled_data_and_the_right_class_count(image_folder, labelled_folder, tmp_path):
    with pytest.raises(ConfigError, match=f"{image_folder} has no class labels"):
        make_trainer(image_folder, tmp_path / "a", *CONDITIONAL)
    with pytest.raises(ConfigError, match="model.conditional=2, but .* has 3 classes"):
        make_trainer(labelled_folder, tmp_path / "b", "model.conditional=2")


def test_resolved_class_count_is_saved_and_rebuilds_a_conditional_generator(labelled_folder, tmp_path):
    import hpcgan

    out = tmp_path / "run"
    trainer = make_trainer(labelled_folder, out, *CONDITIONAL, "train.steps=1", "train.class_balance=balanced",
                           "train.sample_every=1")
    assert trainer.fit() == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["conditional"] == 3
    state = json.loads(next(out.glob("checkpoints/step-*/state.json")).read_text())
    assert state["classes"] == dict.fromkeys(CLASSES, 16)
    G = hpcgan.load_generator(out)
    assert G.num_classes == 3 and G(torch.randn(2, G.nz), torch.tensor([0, 2])).shape == (2, 1, 64, 64)
    assert (out / "samples" / "step-0000001.png").is_file()


CONDITIONAL_RESUME = {
    "dcgan": ["model.spectral_norm=true", "train.loss=hinge", "train.class_balance=balanced"],
    "stylegan2": [*STYLEGAN2, *SMALL_DATA],
    "fastgan": [*FASTGAN, *SMALL_DATA],
}


@pytest.mark.parametrize("arch", list(CONDITIONAL_RESUME))
def test_conditional_resume_is_bit_exact(arch, labelled_folder, tmp_path):
    sets = [*CONDITIONAL, *CONDITIONAL_RESUME[arch], "checkpoint.every=100"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert make_trainer(labelled_folder, straight, *sets, "train.steps=8").fit() == 0
    assert make_trainer(labelled_folder, resumed, *sets, "train.steps=4").fit() == 0
    again = make_trainer(labelled_folder, resumed, *sets, "train.steps=8")
    assert again.fit() == 0 and again.state.restarts == 1
    assert_identical(final_weights(resumed), final_weights(straight))


def test_resume_refuses_data_whose_classes_changed(labelled_folder, tmp_path):
    out = tmp_path / "run"
    assert make_trainer(labelled_folder, out, *CONDITIONAL, "train.steps=1").fit() == 0
    renamed = tmp_path / "renamed"
    for i, name in enumerate(("a", "b", "c")):
        write_image_folder(renamed / name, n=16, seed=10 + i)
    with pytest.raises(ConfigError, match="label indices would change meaning"):
        make_trainer(renamed, out, *CONDITIONAL, "train.steps=2").fit()


@pytest.mark.parametrize("arch", ["dcgan", "stylegan2", "fastgan"])
def test_conditional_bf16_autocast_steps_are_finite(arch, labelled_folder, tmp_path):
    trainer = make_trainer(labelled_folder, tmp_path / "run", *CONDITIONAL, *MODELS[arch],
                           *SMALL_DATA, "train.mixed_precision=bf16", "train.steps=2")
    assert trainer.fit() == 0
    assert all(torch.isfinite(p).all() for p in [*trainer.generator.parameters(), *trainer.discriminator.parameters()])


@pytest.mark.slow
def test_conditional_ranks_hold_equal_weights_under_ddp(labelled_folder, tmp_path):
    report = ddp_report(tmp_path / "run", 3, f"data.path={labelled_folder}", *TINY, *CONDITIONAL,
                        "train.class_balance=balanced", *SMALL_DATA)
    assert len(report) == 6 and all(r["equal"] for r in report)


@pytest.fixture(scope="module")
def conditional_run(labelled_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conditional") / "run"
    assert make_trainer(labelled_folder, out, *CONDITIONAL, "train.steps=2").fit() == 0
    return out


def test_sample_class_writes_only_that_class_marked(conditional_run, tmp_path):
    out = tmp_path / "png"
    assert main(["sample", "--run", str(conditional_run), "--n", "5", "--class", "coronal", "--out", str(out)]) == 0
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 5 and {p.parent.name for p in pngs} == {"coronal"}
    text = Image.open(pngs[0]).text
    assert text["hpcgan:synthetic"] == "true" and text["hpcgan:class"] == "coronal"
    assert "SYNTHETIC" in text["Description"]
    card = json.loads((out / "datacard.json").read_text())
    assert card["classes"] == {"coronal": 5} and card["class_balance"] == "data"
    assert "coronal 5" in (out / "DATACARD.md").read_text()


def test_sample_by_index_into_shards_keeps_labels_and_trains_again(conditional_run, tmp_path):
    out = tmp_path / "shards"
    assert main(["sample", "--run", str(conditional_run), "--n", "9", "--class", "0", "--class", "sagittal",
                 "--format", "shards", "--out", str(out)]) == 0
    manifest = shards.read_manifest(out)
    assert manifest["classes"] == list(CLASSES) and manifest["class_counts"]["train"] == {"axial": 5, "sagittal": 4}
    split = shards.open_split(out, "train")
    assert sorted(split.labels.tolist()) == [0] * 5 + [2] * 4
    again = tmp_path / "again"  # through a streaming reader: labels come from the shards' cls members
    assert main(train_args(out, again, *CONDITIONAL, "data.reader=webdataset", "train.steps=1")) == 0
    state = json.loads(next(again.glob("checkpoints/step-*/state.json")).read_text())
    assert state["classes"] == {"axial": 5, "coronal": 0, "sagittal": 4}
    nifti = tmp_path / "nifti"
    assert main(["sample", "--run", str(conditional_run), "--n", "6", "--format", "nifti", "--out", str(nifti)]) == 0
    assert sorted(p.name for p in nifti.glob("*.nii.gz")) == [f"synthetic-{c}.nii.gz" for c in CLASSES]


def test_evaluate_scores_a_conditional_run(conditional_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HPCGAN_CACHE", str(tmp_path / "cache"))
    assert main(["evaluate", "--run", str(conditional_run), "--metrics", "swd", "--n", "24"]) == 0
    assert json.loads((conditional_run / "metrics.json").read_text())["swd"] > 0


def test_unconditional_run_refuses_class_in_one_line(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert make_trainer(image_folder, out, "train.steps=1").fit() == 0
    assert main(["sample", "--run", str(out), "--n", "2", "--class", "axial", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unconditional" in err and str(out) in err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_tracked_conditional_run_evaluates_as_in_data_and_logs_a_two_input_generator(labelled_folder, tmp_path):
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trainer = make_trainer(labelled_folder, tmp_path / "run", *CONDITIONAL, "track.enabled=true", f"track.uri={uri}",
                           "track.experiment=t", "track.log_model=true", "train.steps=2", "metrics.every=2",
                           "metrics.n=24")
    assert trainer.fit() == 0
    assert torch.bincount(trainer.report.metrics.labels, minlength=3).tolist() == [8, 8, 8]
    client = MlflowClient(uri)
    run = client.get_run(trainer.state.mlflow_run_id)
    assert "eval/swd" in run.data.metrics
    (logged,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    generator = mlflow.pytorch.load_model(f"models:/{logged.model_id}")
    assert generator(torch.randn(3, 100), torch.tensor([0, 1, 2])).shape == (3, 1, 64, 64)


def test_d_filter_keeps_each_class_count_and_class_check_needs_labelled_shards(conditional_run, tmp_path, capsys):
    out = tmp_path / "filtered"
    assert main(["sample", "--run", str(conditional_run), "--n", "9", "--class", "0", "--class", "sagittal",
                 "--filter-d-quantile", "0.5", "--out", str(out)]) == 0
    card = json.loads((out / "datacard.json").read_text())
    assert card["classes"] == {"axial": 5, "sagittal": 4}
    assert card["selection"]["discriminator"]["candidates"] == 18 and card["selection"]["discriminator"]["kept"] == 9
    assert main(["sample", "--run", str(conditional_run), "--n", "3", "--class-check", "0.5",
                 "--out", str(tmp_path / "checked")]) == 2
    err = capsys.readouterr().err
    assert "not a shard folder; --class-check trains a classifier on labelled shards" in err and "\n" not in err.strip()
