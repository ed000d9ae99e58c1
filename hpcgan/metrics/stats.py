"""Gaussian fits of feature sets, below every metric module so the cache, the registry and FID share it.

Nothing here imports another metrics module: `cache`, `registry` and `frechet` all depend on this file
and never on each other in a circle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def as_float64(x: ArrayLike) -> torch.Tensor:
    """(N, D) features as a float64 tensor on their device (arrays land on the CPU)."""
    t = x.detach().double() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x, np.float64))
    if t.ndim != 2:
        raise ValueError(f"expected (N, D) features, got shape {tuple(t.shape)}")
    return t


def feature_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of (N, D) features."""
    feats = as_float64(features).cpu().numpy()
    return feats.mean(0), np.atleast_2d(np.cov(feats, rowvar=False))


@dataclass
class RealStats:
    features: torch.Tensor  # (N, D) float32, for KID and precision/recall
    mu: torch.Tensor  # (D,) float64, for FID
    sigma: torch.Tensor  # (D, D) float64

    @classmethod
    def from_features(cls, features: torch.Tensor) -> RealStats:
        mu, sigma = feature_stats(features)
        return cls(features=features.detach().cpu().float(), mu=torch.from_numpy(mu),
                   sigma=torch.from_numpy(sigma))
