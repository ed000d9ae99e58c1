"""Sample-quality metrics for generated MRI slices; see docs/metrics.md for what the numbers mean.

Registered names: "swd", "msssim", "fid", "kid", "pr", "dc", "memorization", "c2st". Importing the package
registers them all. `utility_test` is no registered metric: it needs class labels and trains classifiers.
"""

from hpcgan.metrics.c2st import C2STResult, c2st, two_sample_test
from hpcgan.metrics.cache import RealStatsCache
from hpcgan.metrics.distributed import compute_real_stats, evaluate_distributed, gather_to_main, shard
from hpcgan.metrics.encoder import (
    EncoderSettings,
    SSLFeatures,
    data_fingerprint,
    default_cache_dir,
    encoder_path,
    find_encoder,
    train_features,
)
from hpcgan.metrics.features import (
    WEIGHTS_ENV,
    FeatureExtractor,
    FeatureWeightsError,
    PixelProjection,
    TorchScriptFeatures,
    extract,
    load_torchscript,
    resolve_weights,
)
from hpcgan.metrics.frechet import fid_from_features, frechet_distance, kid_from_features, kid_subsets
from hpcgan.metrics.knn_pr import density_coverage, knn_radii, precision_recall
from hpcgan.metrics.memorization import AuditResult, memorization_audit, save_pairs_png
from hpcgan.metrics.msssim import ms_ssim, ms_ssim_diversity, ssim
from hpcgan.metrics.registry import (MetricContext, available, best_names, evaluate, get, register,
                                     uses_features)
from hpcgan.metrics.sliced_wasserstein import laplacian_pyramid, swd
from hpcgan.metrics.spaces import load_extractor
from hpcgan.metrics.stats import RealStats, feature_stats
from hpcgan.metrics.utility import ClassifierSettings, balanced_accuracy, macro_auc, utility_test
from hpcgan.metrics.validation import Disturbance, copy_audit, disturbance_curves, markdown_table, monotone

__all__ = [
    "AuditResult", "C2STResult", "ClassifierSettings", "Disturbance", "EncoderSettings", "FeatureExtractor",
    "FeatureWeightsError", "MetricContext", "PixelProjection", "RealStats", "RealStatsCache", "SSLFeatures",
    "TorchScriptFeatures", "WEIGHTS_ENV", "available", "balanced_accuracy", "best_names", "c2st",
    "compute_real_stats", "copy_audit",
    "data_fingerprint", "default_cache_dir", "density_coverage", "disturbance_curves", "encoder_path", "evaluate",
    "evaluate_distributed", "extract", "feature_stats", "fid_from_features", "find_encoder", "frechet_distance",
    "gather_to_main", "get", "kid_from_features", "kid_subsets", "knn_radii", "laplacian_pyramid", "load_extractor",
    "load_torchscript", "macro_auc", "markdown_table", "memorization_audit", "monotone", "ms_ssim",
    "ms_ssim_diversity", "precision_recall", "register", "resolve_weights", "save_pairs_png", "shard", "ssim",
    "swd", "train_features", "two_sample_test", "uses_features", "utility_test",
]
