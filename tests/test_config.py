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


@pytest.mark.parametrize("override, message", [
    (["model.arch=fakearch"], "model.arch='fakearch': must be one of dcgan, fastgan, stylegan2"),
    (["train.loss=wgan"], "train.loss='wgan': must be one of logistic, hinge"),
    (["data.reader=fast"], "data.reader='fast': must be one of auto, memory, webdataset, dali"),
    (["augment.ops=[flip, warp]"], "augment.ops='warp': must be one of flip, rot90"),
    (["metrics.names=[swd, isc]"], "metrics.names='isc': must be one of"),
    (["metrics.best=msssim"], "metrics.best='msssim': must be one of fid, kid, swd"),
    (["metrics.best=fid"], "metrics.best=fid with metrics.names=['swd', 'msssim']: best/ is chosen by a metric"),
    (["train.sync_batchnorm=true", "train.r1_gamma=1"],
     "train.sync_batchnorm=true with train.r1_gamma=1: SyncBatchNorm has no double backward"),
    (["model.arch=stylegan2", "model.spectral_norm=true"], "model.spectral_norm=true with model.arch=stylegan2"),
    (["train.dist_timeout_s=0"], "train.dist_timeout_s=0.0: must be > 0"),
])
def test_choices_and_combinations_are_refused_naming_the_keys(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(overrides=override)


def test_a_new_registry_entry_is_accepted_by_validation(monkeypatch):
    """Validation reads the registries: what is registered (an arch, a loss, a reader, an augmentation op,
    a metric) is a valid value at once, with no list in the config to update."""
    import hpcgan.augment.ops
    import hpcgan.data
    import hpcgan.metrics.registry as registry
    import hpcgan.models
    import hpcgan.models.losses
    from hpcgan.metrics import register

    sets = ["model.arch=fakearch", "train.loss=wgan", "data.reader=fast", "augment.ops=[flip, warp]",
            "metrics.names=[swd, isc]", "metrics.best=isc"]
    for override in sets:
        with pytest.raises(ConfigError):
            build_config(overrides=[override])
    monkeypatch.setitem(hpcgan.models.ARCHS, "fakearch", "tests.nowhere")
    monkeypatch.setattr(hpcgan.models.losses, "LOSSES", (*hpcgan.models.losses.LOSSES, "wgan"))
    monkeypatch.setitem(hpcgan.data.SHARD_READERS, "fast", lambda split, cfg, common: None)
    monkeypatch.setattr(hpcgan.augment.ops, "ALL_OPS", (*hpcgan.augment.ops.ALL_OPS, "warp"))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_BEST", set(registry._BEST))
    register("isc", best=True)(lambda ctx: {"isc": 0.0})
    cfg = build_config(overrides=sets)
    assert (cfg.model.arch, cfg.train.loss, cfg.data.reader, cfg.augment.ops, cfg.metrics.best) == (
        "fakearch", "wgan", "fast", ["flip", "warp"], "isc")


def _listed(text: str) -> list[str]:
    """The values a `a | b (note) | c` comment lists: the first word of each alternative."""
    return [re.match(r"\s*([\w-]+)", part).group(1) for part in text.split("|")]


def test_documented_choices_match_the_registries():
    """Every list of allowed values a person reads (config.py's comments, docs/training.md's table, the
    metrics package's docstring) is exactly what validation accepts."""
    from pathlib import Path

    import hpcgan.config
    import hpcgan.metrics
    from hpcgan.config import registered_choices

    choices = registered_choices()
    source = Path(hpcgan.config.__file__).read_text()
    commented = {"model.arch": "arch", "data.reader": "reader", "train.loss": "loss", "augment.mode": "mode",
                 "metrics.best": "best", "train.mixed_precision": "mixed_precision"}
    for key, name in commented.items():
        line = re.search(rf"^((?:    #.*\n)?)    {name}: str = [^#\n]*(?:# (.*))?$", source, re.M)
        comment = line.group(2) if "|" in (line.group(2) or "") else line.group(1).strip("# \n")
        assert set(_listed(comment.split(", one of")[0])) == set(choices[key]), key

    rows = {}
    docs = (Path(hpcgan.config.__file__).parents[1] / "docs" / "training.md").read_text()
    for row in re.findall(r"^\| (`[^|]*) \| ([^|]*) \| ([^|]*) \|$", docs, re.M):
        rows[re.findall(r"`([^`]+)`", row[0])[-1 if "metrics.names" in row[0] else 0]] = row
    for key in ("model.arch", "data.reader", "train.loss", "augment.mode", "train.mixed_precision",
                "train.class_balance", "metrics.best"):
        values = [v for v in re.findall(r"`([^`]+)`", rows[key][2]) if "." not in v]
        assert set(values) == set(choices[key]), key
    ops = {*map(str.strip, rows["augment.ops"][1].split(",")), *re.findall(r"`([^`]+)`", rows["augment.ops"][2])}
    assert ops == set(choices["augment.ops"])
    names = re.findall(r"`([^`]+)`", rows["metrics.names"][2].split("names:")[1])
    assert set(names) == set(choices["metrics.names"])
    registered = re.search(r"Registered names: (.*?)\.", hpcgan.metrics.__doc__).group(1)
    assert set(re.findall(r'"(\w+)"', registered)) == set(choices["metrics.names"])


def test_preset_by_name_even_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    """`--config quickstart` run from a folder that holds a run folder called quickstart."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").mkdir()
    assert build_config(files=["quickstart"]).train.steps == 2000
