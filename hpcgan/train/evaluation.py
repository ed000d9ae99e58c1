"""Quality metrics inside the training loop: EMA samples against a fixed held-out real subset.

The real subset, its cached statistics and the latent vectors are fixed at start, so every evaluation
measures the same thing and curves are comparable across restarts. Each rank generates its share; the
metrics package gathers the shares and all ranks get the same numbers. Nothing here touches the
training RNG streams (every draw uses its own seeded generator), so metrics never change training.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

import hpcgan.metrics as M
from hpcgan.config import Config
from hpcgan.data import load_real, shards
from hpcgan.data.pixels import to_unit
from hpcgan.train.samples import generate


def dataset_key(path: str) -> str:
    """Cache key of a dataset: the shard manifest's hash, else the path and its modification time."""
    if shards.is_shard_dir(Path(path)):
        return shards.fingerprint(Path(path))
    stat = Path(path).stat()
    return hashlib.sha256(f"{Path(path).resolve()}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


class InLoopMetrics:
    def __init__(self, cfg: Config, device: torch.device, cache_dir: Path) -> None:
        mcfg = cfg.metrics
        self.names, self.seed = list(mcfg.names), cfg.seed
        real = load_real(cfg.data.path, split="val", size=cfg.model.resolution)
        n = min(mcfg.n, len(real))
        pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(cfg.seed))[:n]
        mine = M.shard(n)
        self.real = to_unit(real[pick][mine]).to(device)
        self.z = torch.randn(n, cfg.model.nz, generator=torch.Generator().manual_seed(cfg.seed + 1))[mine].to(device)
        self.extractor = M.load_extractor(mcfg.inception_weights, device=device)
        self.stats = None
        if self.extractor is not None and M.uses_features(self.names):
            key = f"{dataset_key(cfg.data.path)}-r{cfg.model.resolution}-n{n}-seed{cfg.seed}"
            self.stats = M.compute_real_stats(self.real, self.extractor, cache=M.RealStatsCache(cache_dir), key=key)

    def __call__(self, generator: torch.nn.Module) -> dict[str, float]:
        result = M.evaluate_distributed(self.names, self.real, generate(generator, self.z), extractor=self.extractor,
                                        real_stats=self.stats, seed=self.seed)
        return {k: v for k, v in result.items() if isinstance(v, float)}
