"""Metrics by name, and the one entry point (`evaluate`) the trainer and notebooks call.

A metric is a function `MetricContext -> dict[str, float | str]`. Keys carry the metric's name as
prefix ("swd", "swd_16", "fid", "fid_skipped", ...) so results of several metrics merge into one flat
dict that goes straight to MLflow (after dropping the string values). The registry is a plain dict so
a notebook can add a metric with `@register("mine")` without touching this package.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from hpcgan.metrics.features import FeatureExtractor, extract
from hpcgan.metrics.stats import RealStats

Result = dict[str, float | str]

NO_FEATURES = ("no feature network: train the offline encoder (hpcgan features --data SHARDS) or set "
               "metrics.inception_weights (or HPCGAN_INCEPTION_WEIGHTS) to a TorchScript Inception file, "
               "see docs/metrics.md")


@dataclass
class MetricContext:
    """What every metric may use; features are computed at most once per evaluation and shared."""

    real: torch.Tensor  # (N, 1, H, W) in [-1, 1]
    fake: torch.Tensor  # (M, 1, H, W) in [-1, 1]
    device: torch.device
    extractor: FeatureExtractor | None = None
    seed: int = 0
    out_dir: Path | None = None
    heldout: torch.Tensor | None = None  # real slices not in `real`, to calibrate the memorization audit
    real_stats: RealStats | None = None  # cached real features (skips the extractor on `real`)
    fake_features: torch.Tensor | None = None  # precomputed, e.g. gathered across ranks
    _memo: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def has_features(self) -> bool:
        real_ok = self.extractor is not None or self.real_stats is not None
        fake_ok = self.extractor is not None or self.fake_features is not None
        return real_ok and fake_ok

    def feature_space(self) -> str:
        """Which features the numbers were measured in, for the report: the extractor's
        `description` when it has one, else its name."""
        if self.extractor is None:
            return "precomputed-features"
        return str(getattr(self.extractor, "description", self.extractor.name))

    def metric_suffix(self) -> str:
        """Appended to feature-metric keys ("kid_ssl") for extractors that ask for it, so numbers in
        other spaces are never read as Inception FID/KID."""
        return str(getattr(self.extractor, "metric_suffix", ""))

    def features(self, which: Literal["real", "fake"]) -> torch.Tensor:
        if which not in self._memo:
            if which == "real" and self.real_stats is not None:
                feats = self.real_stats.features
            elif which == "fake" and self.fake_features is not None:
                feats = self.fake_features
            elif self.extractor is not None:
                feats = extract(self.extractor, self.real if which == "real" else self.fake)
            else:
                raise RuntimeError(NO_FEATURES)
            self._memo[which] = feats.to(self.device, torch.float32)
        return self._memo[which]


MetricFn = Callable[[MetricContext], Result]
_REGISTRY: dict[str, MetricFn] = {}
_USES_FEATURES: set[str] = set()
_BEST: set[str] = set()


def register(name: str, *, features: bool = False, best: bool = False) -> Callable[[MetricFn], MetricFn]:
    """features=True: the metric reads `ctx.features(...)` when a network is available, so a
    distributed evaluation featurises each rank's share up front. best=True: its value under `name` is
    lower for a better generator, so it may select the best checkpoint (`metrics.best`)."""
    def deco(fn: MetricFn) -> MetricFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"metric {name!r} is already registered")
        _REGISTRY[name] = fn
        if features:
            _USES_FEATURES.add(name)
        if best:
            _BEST.add(name)
        return fn
    return deco


def uses_features(names: Iterable[str]) -> bool:
    return any(name in _USES_FEATURES for name in names)


def get(name: str) -> MetricFn:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; available: {', '.join(available())}") from None


def available() -> list[str]:
    return sorted(_REGISTRY)


def best_names() -> list[str]:
    """The metrics that may select the best checkpoint."""
    return sorted(_BEST)


def evaluate(names: Iterable[str], real: torch.Tensor, fake: torch.Tensor, *,
             extractor: FeatureExtractor | None = None, seed: int = 0, out_dir: str | Path | None = None,
             real_stats: RealStats | None = None, fake_features: torch.Tensor | None = None,
             heldout: torch.Tensor | None = None, device: torch.device | str | None = None) -> Result:
    """Run the named metrics on one real and one generated set; deterministic given `seed`.

    Unknown names fail before any work is done, so a config typo never costs an evaluation.
    """
    fns = [get(name) for name in names]
    device = torch.device(device) if device is not None else fake.device
    ctx = MetricContext(
        real=real.detach().to(device, torch.float32), fake=fake.detach().to(device, torch.float32),
        device=device, extractor=extractor, seed=seed, out_dir=Path(out_dir) if out_dir is not None else None,
        heldout=heldout.detach().to(device, torch.float32) if heldout is not None else None,
        real_stats=real_stats, fake_features=fake_features)
    out: Result = {}
    for fn in fns:
        out.update(fn(ctx))
    return out
