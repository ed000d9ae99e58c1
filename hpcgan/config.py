"""Typed run configuration: the dataclasses below are the one source of defaults.

A config is built from the defaults, then a YAML file, then `--set key=value` overrides, in that order.
Unknown keys and values of the wrong type are errors that name the key, so a typo never trains silently
with a default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key or value the user must fix; the message names the key."""


@dataclass
class ModelConfig:
    arch: str = "dcgan"  # dcgan | fastgan | stylegan2 (one module each under hpcgan/models/)
    resolution: int = 64  # 64 * 2**k; each doubling adds one up/down block
    nz: int = 100  # latent size (z)
    channels: int = 1
    # dcgan
    ngf: int = 64
    ndf: int = 64
    spectral_norm: bool = False  # spectral normalisation of D's convolutions (dcgan)
    # stylegan2: feature maps at r x r have min(channel_base // r, channel_max) channels (G and D)
    channel_base: int = 16384
    channel_max: int = 512
    w_dim: int = 512  # intermediate latent (style) size
    mapping_layers: int = 8
    style_mixing: float = 0.9  # probability of mixing two latents in a training forward pass
    # Class-conditional G and projection D: true takes the classes from the data, an integer states their
    # number (checked against the data); the run saves the resolved number. False (or 0): unconditional.
    conditional: int | bool = False

    @property
    def num_classes(self) -> int:
        """Classes of a conditional model, 0 for an unconditional one."""
        if self.conditional is True:
            raise ConfigError("model.conditional=true: the number of classes is taken from the data when "
                              "training starts; build the model from the run's saved config")
        return int(self.conditional)


@dataclass
class DataConfig:
    path: str = ""  # image folder, uint8 tensor file (.pt), or prepared shard folder (manifest.json)
    reader: str = "auto"  # auto | memory | webdataset | dali (hpcgan.data.SHARD_READERS)
    flip: bool = True  # random horizontal flip (left/right hemispheres are near mirror images)
    device_resident: bool = True  # memory reader: keep the uint8 set on the training device
    workers: int = 2  # decode workers for streaming readers


@dataclass
class TrainConfig:
    steps: int | None = None  # total optimizer steps; when unset, derived from epochs
    epochs: int = 25
    batch_size: int = 128  # global, split evenly across ranks
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    # auto: bf16 where native (Ampere+ GPUs, AVX512-BF16/AMX CPUs), else fp16 on GPUs, fp32 on CPUs | no | bf16 | fp16
    mixed_precision: str = "auto"
    ema: bool = True
    ema_decay: float = 0.999
    log_every: int = 50  # steps between host syncs for logging
    sample_every: int = 500  # steps between fixed-noise sample grids
    sync_every: int = 10  # steps between cross-rank interrupt checks (single process checks every step)
    channels_last: bool = True  # measured 1.16-1.30x on CPU (docs/benchmarks.md); cuDNN prefers it too
    compile: bool = False
    compile_mode: str = "default"
    fused_adam: bool = True  # fused/foreach Adam when the device supports it
    sync_batchnorm: bool = False  # SyncBatchNorm under DDP (GPU); otherwise buffers stay per rank
    dist_timeout_s: float = 1800.0  # NCCL/gloo collectives and cross-rank checks fail after this (naming late ranks)
    loss: str = "logistic"  # logistic (non-saturating, BCE on logits) | hinge
    r1_gamma: float = 0.0  # R1 gradient penalty weight on real images; 0 disables
    r1_every: int = 16  # lazy R1: the penalty every N steps, scaled by N
    ema_half_life_images: int = 0  # > 0: EMA decay per step from this half-life in images (overrides ema_decay)
    class_balance: str = "data"  # conditional: fake labels as the real batch's (data) | uniform over classes (balanced)
    # Divergence guard (docs/training.md): a step with a non-finite loss or gradient is skipped and counted;
    # max_bad_steps of them in a row, or D saturated while metrics.best stays worse than its best by
    # divergence_margin (relative) for divergence_patience evaluations, roll back to the last good checkpoint
    # with the learning rates times rollback_lr_factor; after max_rollbacks rollbacks the run gives up (exit 1).
    guard: bool = True
    max_bad_steps: int = 10
    divergence_patience: int = 3
    divergence_margin: float = 0.5
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3
    inject_nan_step: int | None = None  # test hook: the losses of this step are made NaN (not again after a rollback)


@dataclass
class AugmentConfig:
    """Differentiable augmentation of every image D sees, against D overfitting on scarce data."""

    mode: str = "off"  # off | fixed (probability p) | ada (p adapted to D's overfitting)
    p: float = 0.0  # probability of each op per image (fixed), or the starting value (ada)
    target: float = 0.6  # ada: target E[sign(D(real))]
    interval: int = 4  # ada: steps between adjustments of p
    speed_images: int = 100_000  # ada: images over which p can move by 1
    ops: list[str] = field(default_factory=lambda: ["flip", "translate", "scale", "rotate", "aniso",
                                                    "brightness", "contrast", "cutout"])


@dataclass
class CheckpointConfig:
    every: int = 500  # steps
    keep: int = 3  # newest checkpoints kept; milestones are extra
    milestones: list[int] = field(default_factory=list)  # steps kept forever


@dataclass
class TrackConfig:
    enabled: bool = True
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working folder
    experiment: str = "hpcgan"
    run_name: str = ""
    log_model: bool = True  # final EMA generator as an MLflow model
    flush_every_s: float = 2.0
    report: bool = True  # write RUN/report/report.html at the end and log it to MLflow
    system_metrics_every_s: float = 10.0  # MLflow system metrics (CPU, memory, disk, GPU) sampling; 0 disables


def resolve_tracking_uri(uri: str) -> str:
    """`track.uri`, else $MLFLOW_TRACKING_URI, else a SQLite store in the working folder (absolute, so
    jobs started elsewhere, e.g. by SLURM, log into the same store)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


@dataclass
class MetricsConfig:
    every: int = 500  # steps between in-loop metrics (EMA samples vs held-out slices); 0 disables
    names: list[str] = field(default_factory=lambda: ["swd", "msssim"])
    n: int = 1024  # generated and real images per in-loop evaluation
    best: str = "swd"  # swd | fid | kid (lower is better), one of metrics.names: selects best/
    inception_weights: str = ""  # path to pt_inception-2015-12-05 weights or a TorchScript export
    on_interrupt: bool = True  # an interrupted run evaluates its last step after the final save...
    on_interrupt_max_s: float = 20.0  # ...unless an evaluation of this process took longer (SLURM KillWait: 30 s)


@dataclass
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def validate(self) -> Config:
        res = self.model.resolution
        if res < 64 or res & (res - 1):
            raise ConfigError(f"model.resolution={res}: must be 64 * 2**k (64, 128, 256, ...)")
        check_choices(self)
        positive = {
            "model.nz": self.model.nz, "model.ngf": self.model.ngf, "model.ndf": self.model.ndf,
            "train.batch_size": self.train.batch_size, "train.epochs": self.train.epochs,
            "train.log_every": self.train.log_every, "train.sample_every": self.train.sample_every,
            "train.sync_every": self.train.sync_every, "checkpoint.every": self.checkpoint.every,
            "checkpoint.keep": self.checkpoint.keep, "train.r1_every": self.train.r1_every,
            "model.channel_base": self.model.channel_base, "model.channel_max": self.model.channel_max,
            "model.w_dim": self.model.w_dim, "model.mapping_layers": self.model.mapping_layers,
            "model.channels": self.model.channels, "augment.interval": self.augment.interval,
            "augment.speed_images": self.augment.speed_images, "metrics.n": self.metrics.n,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key}={value}: must be >= 1")
        if self.train.steps is not None and self.train.steps < 0:
            raise ConfigError(f"train.steps={self.train.steps}: must be >= 0")
        below_one = {"train.ema_decay": self.train.ema_decay, "train.beta1": self.train.beta1,
                     "train.beta2": self.train.beta2}
        for key, value in below_one.items():
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{key}={value}: must be in [0, 1)")
        probabilities = {"model.style_mixing": self.model.style_mixing, "augment.p": self.augment.p,
                         "augment.target": self.augment.target}
        for key, value in probabilities.items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key}={value}: must be in [0, 1]")
        if self.train.dist_timeout_s <= 0:
            raise ConfigError(f"train.dist_timeout_s={self.train.dist_timeout_s}: must be > 0")
        for key, value in {"train.lr": self.train.lr, "train.r1_gamma": self.train.r1_gamma,
                           "data.workers": self.data.workers, "track.flush_every_s": self.track.flush_every_s,
                           "train.ema_half_life_images": self.train.ema_half_life_images,
                           "model.conditional": self.model.conditional}.items():
            if value < 0:
                raise ConfigError(f"{key}={value}: must be >= 0")
        check_combinations(self)
        self._validate_guard()
        return self

    def _validate_guard(self) -> None:
        for key, value in flatten(self).items():
            if isinstance(value, float) and math.isnan(value):
                raise ConfigError(f"{key}=nan: must be a number")
        t = self.train
        for key, value in {"train.max_bad_steps": t.max_bad_steps,
                           "train.divergence_patience": t.divergence_patience}.items():
            if value < 1:
                raise ConfigError(f"{key}={value}: must be >= 1")
        if t.max_rollbacks < 0 or t.divergence_margin < 0:
            key, value = ("train.max_rollbacks", t.max_rollbacks) if t.max_rollbacks < 0 else \
                ("train.divergence_margin", t.divergence_margin)
            raise ConfigError(f"{key}={value}: must be >= 0")
        if not 0.0 < t.rollback_lr_factor <= 1.0:
            raise ConfigError(f"train.rollback_lr_factor={t.rollback_lr_factor}: must be in (0, 1]")
        if t.inject_nan_step is not None and t.inject_nan_step < 1:
            raise ConfigError(f"train.inject_nan_step={t.inject_nan_step}: must be a step >= 1 or null")


def registered_choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of every key that names something registered, read from the registries that
    define them, so that a new arch, loss, metric, augmentation op or reader is accepted once registered.
    Imported here and not at the top: config sits below those packages, which import it."""
    from hpcgan.augment.ops import ALL_OPS
    from hpcgan.augment.pipe import MODES
    from hpcgan.data import SHARD_READERS
    from hpcgan.metrics import available, best_names
    from hpcgan.models import ARCHS
    from hpcgan.models.losses import LOSSES

    return {"model.arch": tuple(ARCHS), "data.reader": ("auto", *SHARD_READERS), "train.loss": tuple(LOSSES),
            "augment.mode": tuple(MODES), "augment.ops": tuple(ALL_OPS), "metrics.names": tuple(available()),
            "metrics.best": tuple(best_names()),
            "train.mixed_precision": ("auto", "no", "bf16", "fp16"), "train.class_balance": ("data", "balanced")}


def check_choices(cfg: Config) -> None:
    """Every key that names a choice holds one the registries know (list keys: every item)."""
    for key, allowed in registered_choices().items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        for item in value if isinstance(value, list) else [value]:
            if item not in allowed:
                raise ConfigError(f"{key}={item!r}: must be one of {', '.join(allowed)}")


def check_combinations(cfg: Config) -> None:
    """Settings that each work but not together: refused before any work, naming both keys."""
    m, t = cfg.model, cfg.train
    if t.sync_batchnorm and t.r1_gamma > 0:
        raise ConfigError(f"train.sync_batchnorm=true with train.r1_gamma={t.r1_gamma:g}: SyncBatchNorm has no "
                          "double backward, which R1 needs; set train.sync_batchnorm=false or train.r1_gamma=0")
    if m.spectral_norm and m.arch != "dcgan":
        raise ConfigError(f"model.spectral_norm=true with model.arch={m.arch}: only dcgan's D has spectral "
                          "normalisation; set model.spectral_norm=false (R1, train.r1_gamma, regularises it)")
    if cfg.metrics.every and cfg.metrics.best not in cfg.metrics.names:
        raise ConfigError(f"metrics.best={cfg.metrics.best} with metrics.names={cfg.metrics.names}: best/ is "
                          "chosen by a metric the run evaluates; add it to metrics.names or pick one of them")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(cfg: Config) -> dict[str, Any]:
    """`{"train.lr": 2e-4, ...}`: the form MLflow params and `--set` use."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: dict[str, Any]) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(f"{name}.", value)
            else:
                out[name] = value

    walk("", to_dict(cfg))
    return out


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the field's type hint; YAML already parsed scalars, so no string guessing."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(key, value, inner[0])
        for option in inner:  # e.g. int | bool: the first type that takes the value as it is
            try:
                return _coerce(key, value, option)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(h.__name__ for h in inner)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(key, v, item) for v in value]
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # PyYAML reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if hint is str and isinstance(value, bool):  # YAML 1.1 reads `no`/`off` as false
        return "yes" if value else "no"
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint in (float, str) and not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def _apply(node: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(node))
    for key, value in updates.items():
        name = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(f"{prefix}{k}" for k in hints)
            raise ConfigError(f"unknown config key '{name}' (known here: {known})")
        current = getattr(node, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: expected a section (mapping), got {value!r}")
            _apply(current, value, f"{name}.")
        else:
            setattr(node, key, _coerce(name, value, hints[key]))


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: '{part}' is a value, not a section")
        node[leaf] = value
    return nested


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-4", "model.ngf=8"]` -> nested dict; values parsed as YAML scalars."""
    dotted: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. train.lr=1e-4")
        try:
            dotted[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {pair!r}: value is not valid YAML ({err})") from None
    return _nest(dotted)


PRESETS = Path(__file__).parent / "configs"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file, or a preset shipped with the package by name (`--config quickstart`)."""
    path = Path(path)
    if not path.is_file() and (PRESETS / f"{path}.yaml").is_file():  # a folder named like a preset is no config
        path = PRESETS / f"{path}.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    return data


def build_config(base: dict[str, Any] | None = None, files: list[str | Path] = (),
                 overrides: list[str] = ()) -> Config:
    """Defaults <- base (e.g. a run's saved config) <- YAML files <- `--set` overrides."""
    cfg = Config()
    if base:
        _apply(cfg, base)
    for path in files:
        _apply(cfg, read_yaml(path))
    _apply(cfg, parse_overrides(list(overrides)))
    return cfg.validate()


def config_text(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(config_text(cfg))


def load_config(path: str | Path) -> Config:
    return build_config(base=read_yaml(path))
