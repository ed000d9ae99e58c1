"""What every arch must do: train with augmentation (fixed and adaptive) and lazy R1, resume bit-exactly,
run under bf16 autocast, reach 256 px, and keep DDP ranks equal."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import TINY, assert_identical, ddp_report, final_weights, make_trainer

# Tiny StyleGAN2: a few thousand parameters, seconds per step on 2 CPU cores.
STYLEGAN2 = ["model.arch=stylegan2", "model.channel_base=256", "model.channel_max=16", "model.w_dim=32",
             "model.mapping_layers=2", "model.nz=32"]
FASTGAN = ["model.arch=fastgan", "train.loss=hinge"]
ARCHS = {
    "dcgan": [],
    "dcgan-sn-hinge": ["model.spectral_norm=true", "train.loss=hinge"],
    "stylegan2": STYLEGAN2,
    "fastgan": FASTGAN,
}
SMALL_DATA = ["augment.mode=ada", "augment.p=0.2", "augment.interval=2", "augment.speed_images=64",
              "train.r1_gamma=1.0", "train.r1_every=3"]


@pytest.fixture(params=list(ARCHS), scope="module")
def arch(request) -> list[str]:
    return ARCHS[request.param]


@pytest.fixture(scope="module")
def reference(arch, image_folder, tmp_path_factory):
    """12 uninterrupted steps of the arch with ADA and lazy R1: the weights every resume must reach."""
    out = tmp_path_factory.mktemp("ref") / "run"
    trainer = make_trainer(image_folder, out, *arch, *SMALL_DATA, "train.steps=12", "checkpoint.every=100")
    assert trainer.fit() == 0
    return final_weights(out), trainer.augment.p


def test_resume_with_adaptive_augmentation_and_r1_is_bit_exact(arch, image_folder, tmp_path, reference):
    weights, p_final = reference
    out = tmp_path / "run"
    first = make_trainer(image_folder, out, *arch, *SMALL_DATA, "train.steps=7", "checkpoint.every=100")
    assert first.fit() == 0
    second = make_trainer(image_folder, out, *arch, *SMALL_DATA, "train.steps=12", "checkpoint.every=100")
    assert second.fit() == 0 and second.state.restarts == 1
    assert second.augment.p == p_final != 0.2  # the probability moved, and was restored exactly
    assert_identical(final_weights(out), weights)


def test_fixed_augmentation_probability_stays_and_is_logged(image_folder, tmp_path):
    out = tmp_path / "run"
    trainer = make_trainer(image_folder, out, *STYLEGAN2, "augment.mode=fixed", "augment.p=0.3", "train.steps=4")
    assert trainer.fit() == 0 and trainer.augment.p == 0.3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["augment_p"] == 0.3 for r in records if "loss_d" in r)


def test_bf16_autocast_trains_every_arch(arch, image_folder, tmp_path):
    trainer = make_trainer(image_folder, tmp_path / "run", *arch, *SMALL_DATA, "train.mixed_precision=bf16",
                           "train.steps=4")
    assert trainer.fit() == 0
    assert all(torch.isfinite(p).all() for p in trainer.generator.parameters())


def test_stylegan2_at_256_px_trains_and_resumes(tmp_path):
    from helpers import write_image_folder

    data = write_image_folder(tmp_path / "big", n=8, size=256)
    sets = [*STYLEGAN2, "model.resolution=256", "train.batch_size=4", *SMALL_DATA]
    out = tmp_path / "run"
    assert make_trainer(data, out, *sets, "train.steps=1").fit() == 0
    resumed = make_trainer(data, out, *sets, "train.steps=2")
    assert resumed.fit() == 0 and resumed.state.restarts == 1 and resumed.state.step == 2
    image = resumed.sample_generator(torch.randn(2, 32))
    assert image.shape == (2, 1, 256, 256)


@pytest.mark.slow
@pytest.mark.parametrize("arch_sets", [STYLEGAN2, FASTGAN], ids=["stylegan2", "fastgan"])
def test_ranks_hold_equal_weights_under_ddp(arch_sets, image_folder, tmp_path):
    report = ddp_report(tmp_path / "run", 4, f"data.path={image_folder}", *TINY, *arch_sets, *SMALL_DATA)
    assert len(report) == 8 and all(r["equal"] for r in report)
