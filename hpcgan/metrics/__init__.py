"""Sample-quality metrics for generated MRI slices; see docs/metrics.md for what the numbers mean.

Registered names: "swd", "msssim", "fid", "kid", "pr", "memorization". Importing the package
registers them all.
"""

from hpcgan.metrics.cache import RealStats, RealStatsCache
from hpcgan.metrics.distributed import compute_real_stats, evaluate_distributed, gather_rows, shard
from hpcgan.metrics.features import (
    WEIGHTS_ENV,
    FeatureExtractor,
    FeatureWeightsError,
    PixelProjection,
    TorchScriptFeatures,
    extract,
    load_extractor,
    resolve_weights,
)
from hpcgan.metrics.frechet import (
    feature_stats,
    fid_from_features,
    frechet_distance,
    kid_from_features,
    kid_subsets,
)
from hpcgan.metrics.knn_pr import knn_radii, precision_recall
from hpcgan.metrics.memorization import AuditResult, memorization_audit, save_pairs_png
from hpcgan.metrics.msssim import ms_ssim, ms_ssim_diversity, ssim
from hpcgan.metrics.registry import MetricContext, available, evaluate, get, register, uses_features
from hpcgan.metrics.sliced_wasserstein import laplacian_pyramid, swd

__all__ = [
    "AuditResult", "FeatureExtractor", "FeatureWeightsError", "MetricContext", "PixelProjection",
    "RealStats", "RealStatsCache", "TorchScriptFeatures", "WEIGHTS_ENV", "available", "compute_real_stats",
    "evaluate", "evaluate_distributed", "extract", "feature_stats", "fid_from_features", "frechet_distance",
    "gather_rows", "get", "kid_from_features", "kid_subsets", "knn_radii", "laplacian_pyramid",
    "load_extractor", "memorization_audit", "ms_ssim", "ms_ssim_diversity", "precision_recall", "register",
    "resolve_weights", "save_pairs_png", "shard", "ssim", "swd", "uses_features",
]
