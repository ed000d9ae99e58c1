"""k-NN manifold metrics: fidelity and coverage as separate numbers, where FID mixes the two.

Improved precision and recall (Kynkaenniemi et al. 2019): each set's manifold is the union of balls
around its points with radius = distance to the k-th nearest neighbour (k=3). Precision = share of
generated points inside the real manifold (are the slices realistic?); recall = share of real points
inside the generated manifold (does the generator cover all anatomies?). A collapsing generator keeps
precision and loses recall.

Density and coverage (Naeem et al. 2020, k=5) use the real balls only, so one outlier among the
generated points cannot inflate a manifold: density = how many real balls hold a generated point,
over k (about 1 for matching distributions, above 1 where generated points crowd real ones);
coverage = share of real balls that hold any generated point.

Distances are computed in row blocks of at most `block_bytes`, so memory stays bounded for any N. A
point on a ball's boundary counts as inside: cdist's matrix-product path rounds one pair's distance
differently from block to block and from CPU to CPU, so membership allows `_ROUNDING` relative slack.
"""

from __future__ import annotations

import torch

from hpcgan.metrics.features import PixelProjection, extract
from hpcgan.metrics.registry import MetricContext, Result, register

_BLOCK_BYTES = 64 << 20
_ROUNDING = 1 + 1e-9  # float64 distances agree far closer than this; real gaps are far wider


def _rows_per_block(n_cols: int, block_bytes: int) -> int:
    return max(1, block_bytes // (8 * n_cols))


def knn_radii(features: torch.Tensor, k: int = 3, *, block_bytes: int = _BLOCK_BYTES) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point."""
    if len(features) <= k:
        raise ValueError(f"k={k} nearest neighbours need more than {k} points, got {len(features)}")
    feats = features.double()
    rows = _rows_per_block(len(feats), block_bytes)
    # k + 1: every point is its own nearest neighbour at distance 0.
    return torch.cat([torch.cdist(feats[s:s + rows], feats).kthvalue(k + 1, dim=1).values
                      for s in range(0, len(feats), rows)])


def _inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block_bytes: int) -> torch.Tensor:
    q, c = queries.double(), centres.double()
    rows = _rows_per_block(len(c), block_bytes)
    return torch.cat([(torch.cdist(q[s:s + rows], c) <= radii[None, :] * _ROUNDING).any(dim=1)
                      for s in range(0, len(q), rows)])


def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, *, k: int = 3,
                     block_bytes: int = _BLOCK_BYTES) -> dict[str, float]:
    """{"precision", "recall"} of (N, D) and (M, D) feature sets; float64 distances."""
    real, fake = real_features, fake_features.to(real_features.device)
    precision = _inside(fake, real, knn_radii(real, k, block_bytes=block_bytes), block_bytes)
    recall = _inside(real, fake, knn_radii(fake, k, block_bytes=block_bytes), block_bytes)
    return {"precision": float(precision.double().mean()), "recall": float(recall.double().mean())}


def density_coverage(real_features: torch.Tensor, fake_features: torch.Tensor, *, k: int = 5,
                     block_bytes: int = _BLOCK_BYTES) -> dict[str, float]:
    """{"density", "coverage"} of (N, D) real and (M, D) generated features; float64 distances."""
    real, fake = real_features.double(), fake_features.to(real_features.device).double()
    radii = knn_radii(real, k, block_bytes=block_bytes)
    rows = _rows_per_block(len(real), block_bytes)
    inside_count = torch.zeros((), dtype=torch.float64, device=real.device)
    covered = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    for s in range(0, len(fake), rows):
        inside = torch.cdist(fake[s:s + rows], real) <= radii[None, :] * _ROUNDING
        inside_count += inside.sum()
        covered |= inside.any(dim=0)
    return {"density": float(inside_count) / (k * len(fake)), "coverage": float(covered.double().mean())}


def _feature_sets(ctx: MetricContext) -> tuple[torch.Tensor, torch.Tensor, str, Result]:
    """Real and generated features, the space's name, and the "features" report entry when a
    network made them; without one, a fixed random projection of pixels.

    Both sets are cut to the smaller one's size (its first points): a k-NN radius shrinks as its set
    grows, so 10000 generated points against 106 real ones would push recall to 0 and precision up."""
    if ctx.has_features():
        space = ctx.extractor.name if ctx.extractor is not None else "precomputed-features"
        real, fake, protocol = ctx.features("real"), ctx.features("fake"), {"features": ctx.feature_space()}
    else:
        projection = PixelProjection()
        real, fake, space, protocol = extract(projection, ctx.real), extract(projection, ctx.fake), projection.name, {}
    n = min(len(real), len(fake))
    return real[:n], fake[:n], space, protocol


@register("pr", features=True)
def _pr(ctx: MetricContext) -> Result:
    real, fake, space, protocol = _feature_sets(ctx)
    return {**precision_recall(real, fake), "pr_feature_space": space, **protocol}


@register("dc", features=True)
def _dc(ctx: MetricContext) -> Result:
    real, fake, space, protocol = _feature_sets(ctx)
    return {**density_coverage(real, fake), "dc_feature_space": space, **protocol}
