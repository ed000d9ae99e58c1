"""Real-set feature statistics cached on disk, so the real side is featurised once per dataset.

A file is keyed by the caller's string (e.g. the dataset manifest hash plus the real-subset size and
seed) and by the extractor's name, which already encodes its weights and preprocessing; a stale or
mismatched file is ignored rather than trusted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from hpcgan.metrics.features import FeatureExtractor
from hpcgan.metrics.stats import RealStats


class RealStatsCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str, extractor: FeatureExtractor) -> Path:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{key}__{extractor.name}")
        return self.root / f"{safe}.pt"

    def load(self, key: str, extractor: FeatureExtractor) -> RealStats | None:
        path = self.path(key, extractor)
        if not path.is_file():
            return None
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("key") != key or data.get("extractor") != extractor.name \
                or data["features"].shape[1] != extractor.dim:
            return None
        return RealStats(features=data["features"], mu=data["mu"], sigma=data["sigma"])

    def save(self, key: str, extractor: FeatureExtractor, stats: RealStats) -> Path:
        """Write atomically: concurrent jobs sharing the cache never read a half-written file."""
        path = self.path(key, extractor)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"key": key, "extractor": extractor.name, "features": stats.features,
                    "mu": stats.mu, "sigma": stats.sigma}, tmp)
        os.replace(tmp, path)
        return path
