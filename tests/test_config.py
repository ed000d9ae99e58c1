import re

import pytest

from hpcgan.config import Config, ConfigError, build_config, flatten, load_config, save_config


def test_defaults_are_the_classic_dcgan_values():
    cfg = Config()
    assert (cfg.train.lr, cfg.train.beta1, cfg.train.beta2) == (2e-4, 0.5, 0.999)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.model.nz) == (128, 25, 100)
    assert cfg.model.ngf == cfg.model.ndf == 64 and cfg.model.resolution == 64


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\n  steps: 10\nmodel:\n  resolution: 128\n")
    cfg = build_config(files=[path], overrides=["train.lr=1e-4", "checkpoint.milestones=[5, 10]"])
    assert cfg.train.lr == 1e-4 and cfg.train.steps == 10 and cfg.model.resolution == 128
    assert cfg.checkpoint.milestones == [5, 10]


def test_int_is_accepted_for_float_and_roundtrip(tmp_path):
    cfg = build_config(overrides=["train.lr=1", "seed=3"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert flatten(cfg)["train.lr"] == 1.0


@pytest.mark.parametrize("override, message", [
    (["train.lrr=1"], "unknown config key 'train.lrr'"),
    (["bogus.x=1"], "unknown config key 'bogus'"),
    (["train.batch_size=abc"], "train.batch_size: expected an integer"),
    (["train.batch_size=1.5"], "train.batch_size: expected an integer"),
    (["train.ema=maybe"], "train.ema: expected true/false"),
    (["model.resolution=96"], "model.resolution=96: must be 64 * 2**k"),
    (["model.resolution=32"], "model.resolution=32"),
    (["train.mixed_precision=fp8"], "train.mixed_precision='fp8'"),
    (["train=3"], "train: expected a section"),
    (["train.lr"], "expected key=value"),
    (["train.lr=-1"], "train.lr=-1.0: must be >= 0"),
    (["train.beta2=1"], "train.beta2=1.0: must be in [0, 1)"),
    (["augment.mode=always"], "augment.mode='always'"),
    (["augment.p=1.5"], "augment.p=1.5: must be in [0, 1]"),
    (["model.arch=biggan"], "model.arch='biggan': must be one of"),
    (["train.r1_every=0"], "train.r1_every=0: must be >= 1"),
])
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(overrides=override)


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        build_config(files=[path])
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        build_config(files=[tmp_path / "missing.yaml"])


def test_yaml_no_stays_a_word():
    assert build_config(overrides=["train.mixed_precision=no"]).train.mixed_precision == "no"
