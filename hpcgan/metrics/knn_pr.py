"""Improved precision and recall (Kynkaenniemi et al. 2019): fidelity and coverage as separate numbers.

Each set's manifold is the union of balls around its points with radius = distance to the k-th
nearest neighbour (k=3). Precision = share of generated points inside the real manifold (are the
slices realistic?); recall = share of real points inside the generated manifold (does the generator
cover all anatomies?). FID mixes the two; a collapsing generator keeps precision and loses recall.

Distances are computed in row blocks of at most `block_bytes`, so memory stays bounded for any N.
"""

from __future__ import annotations

import torch

from hpcgan.metrics.features import PixelProjection, extract
from hpcgan.metrics.registry import MetricContext, Result, register

_BLOCK_BYTES = 64 << 20


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
    return torch.cat([(torch.cdist(q[s:s + rows], c) <= radii[None, :]).any(dim=1)
                      for s in range(0, len(q), rows)])


def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, *, k: int = 3,
                     block_bytes: int = _BLOCK_BYTES) -> dict[str, float]:
    """{"precision", "recall"} of (N, D) and (M, D) feature sets; float64 distances."""
    real, fake = real_features, fake_features.to(real_features.device)
    precision = _inside(fake, real, knn_radii(real, k, block_bytes=block_bytes), block_bytes)
    recall = _inside(real, fake, knn_radii(fake, k, block_bytes=block_bytes), block_bytes)
    return {"precision": float(precision.double().mean()), "recall": float(recall.double().mean())}


@register("pr", features=True)
def _pr(ctx: MetricContext) -> Result:
    """Feature network when one is configured, else a fixed random projection of pixels."""
    if ctx.has_features():
        real, fake = ctx.features("real"), ctx.features("fake")
        space = ctx.extractor.name if ctx.extractor is not None else "precomputed-features"
    else:
        projection = PixelProjection()
        real, fake, space = extract(projection, ctx.real), extract(projection, ctx.fake), projection.name
    return {**precision_recall(real, fake), "pr_feature_space": space}
