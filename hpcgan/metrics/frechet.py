"""FID and KID on feature vectors, computed the standard way so numbers compare with the literature.

FID fits a Gaussian to each feature set and takes the Frechet distance in float64 (float32 covariance
products lose several digits at D=2048). KID is the unbiased MMD^2 with the cubic polynomial kernel,
averaged over random subsets; unlike FID it has no bias in the sample size, which matters for the
small in-loop sets.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch

from hpcgan.metrics.registry import NO_FEATURES, MetricContext, Result, register
from hpcgan.metrics.stats import ArrayLike, as_float64, feature_stats

_GRAM_ELEMENTS = 4096 * 4096  # largest real x fake kernel kept whole (128 MiB each in float64)


def _np64(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2).

    sqrtm of a near-singular product can come back non-finite; a tiny ridge fixes that without moving
    the value measurably. Numerical noise gives sqrtm a small imaginary part, which is dropped.
    """
    m1, s1, m2, s2 = (_np64(a) for a in (mu1, sigma1, mu2, sigma2))
    with warnings.catch_warnings():  # fewer samples than dimensions makes S1 S2 singular; that is expected
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            ridge = np.eye(s1.shape[0]) * 1e-6
            covmean = scipy.linalg.sqrtm((s1 + ridge) @ (s2 + ridge))
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))


def fid_from_features(real: ArrayLike, fake: ArrayLike) -> float:
    return frechet_distance(*feature_stats(real), *feature_stats(fake))


def _poly(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b.T / a.shape[1] + 1) ** 3


def kid_subsets(real: ArrayLike, fake: ArrayLike, *, subsets: int = 100, subset_size: int = 1000,
                seed: int = 0) -> np.ndarray:
    """Unbiased MMD^2 (cubic polynomial kernel) of each of `subsets` random subset pairs.

    Float64 on the features' device; subsets are drawn on the CPU so values do not depend on it. Up
    to 4096 x 4096 samples the kernel of every pair is computed once and a subset's kernel sums are
    quadratic forms with its 0/1 membership vector; 100 subsets of 1000 x 2048 computed one by one
    would be ~1.2 TFLOP.
    """
    x_all = as_float64(real)
    y_all = as_float64(fake).to(x_all.device)
    m = min(subset_size, len(x_all), len(y_all))
    if m < 2:
        raise ValueError("KID needs at least 2 samples per set")
    gen = torch.Generator().manual_seed(seed)
    draws = [(torch.randperm(len(x_all), generator=gen)[:m], torch.randperm(len(y_all), generator=gen)[:m])
             for _ in range(subsets)]
    if len(x_all) * len(y_all) <= _GRAM_ELEMENTS:
        wx = x_all.new_zeros(subsets, len(x_all))
        wy = y_all.new_zeros(subsets, len(y_all))
        for s, (ix, iy) in enumerate(draws):
            wx[s, ix.to(wx.device)], wy[s, iy.to(wy.device)] = 1.0, 1.0
        kxx, kyy, kxy = _poly(x_all, x_all), _poly(y_all, y_all), _poly(x_all, y_all)
        within = ((wx @ kxx) * wx).sum(1) - wx @ kxx.diagonal() + ((wy @ kyy) * wy).sum(1) - wy @ kyy.diagonal()
        values = within / (m * (m - 1)) - 2 * ((wx @ kxy) * wy).sum(1) / (m * m)
        return values.cpu().numpy()
    values = np.empty(subsets)
    for s, (ix, iy) in enumerate(draws):
        x, y = x_all[ix.to(x_all.device)], y_all[iy.to(y_all.device)]
        kxx, kyy, kxy = _poly(x, x), _poly(y, y), _poly(x, y)
        within = (kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1))
        values[s] = float(within - 2 * kxy.sum() / (m * m))
    return values


def kid_from_features(real: ArrayLike, fake: ArrayLike, *, subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0) -> float:
    return float(kid_subsets(real, fake, subsets=subsets, subset_size=subset_size, seed=seed).mean())


@register("fid", features=True, best=True)
def _fid(ctx: MetricContext) -> Result:
    """Key "fid" in Inception-like spaces, "fd<suffix>" (e.g. "fd_ssl") where the extractor asks for a suffix."""
    if not ctx.has_features():
        return {"fid_skipped": NO_FEATURES}
    if ctx.real_stats is not None:
        real_mu, real_sigma = ctx.real_stats.mu, ctx.real_stats.sigma
    else:
        real_mu, real_sigma = feature_stats(ctx.features("real"))
    suffix = ctx.metric_suffix()
    value = frechet_distance(real_mu, real_sigma, *feature_stats(ctx.features("fake")))
    return {f"fd{suffix}" if suffix else "fid": value, "features": ctx.feature_space()}


@register("kid", features=True, best=True)
def _kid(ctx: MetricContext) -> Result:
    if not ctx.has_features():
        return {"kid_skipped": NO_FEATURES}
    values = kid_subsets(ctx.features("real"), ctx.features("fake"), seed=ctx.seed)
    suffix = ctx.metric_suffix()
    return {f"kid{suffix}": float(values.mean()), f"kid{suffix}_std": float(values.std()),
            "features": ctx.feature_space()}
