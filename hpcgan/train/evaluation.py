"""Quality metrics inside the training loop: EMA samples against a fixed held-out real subset, each
number beside its real floor.

The real subset, its cached statistics and the latent vectors (with a conditional run's classes, in the
training data's proportions) are fixed at start, so every evaluation measures the same thing and curves
are comparable across restarts. Each rank generates its share; the metrics package gathers the shares
on rank 0 and all ranks get the same numbers. Nothing here touches the training RNG streams (every draw uses its
own seeded generator), so metrics never change training.

The floor is what real slices score under the same protocol: training slices against the held-out set
(`floor`: what a generator that draws from the training distribution would score) and two halves of
the training slices (`floor_halves`). A number means something only beside it: an SWD of 61 says
little until one knows that real-vs-real scores 12. Floors are computed once per data set, by rank 0,
and cached by its fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

import hpcgan.metrics as M
from hpcgan.config import Config
from hpcgan.data import load_real, shards
from hpcgan.data.pixels import to_unit
from hpcgan.train.conditioning import allocate
from hpcgan.train.samples import generate


def dataset_key(path: str) -> str:
    """Cache key of a dataset: the shard manifest's hash, else the path and its modification time."""
    if shards.is_shard_dir(Path(path)):
        return shards.fingerprint(Path(path))
    stat = Path(path).stat()
    return hashlib.sha256(f"{Path(path).resolve()}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _floor_cache() -> Path:
    root = os.environ.get("HPCGAN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hpcgan"
    return Path(root) / "floors"


def real_floors(path: str, names: list[str], size: int, n: int, seed: int, extractor: Any = None) -> dict[str, float]:
    """`{"floor/<metric>": train vs held-out, "floor_halves/<metric>": train half vs half}` for `n` images
    a side (fewer where the data is smaller), cached by the data set's fingerprint and feature space.
    Feature metrics are left out when there is no `extractor`; the memorization audit has no floor."""
    names = [m for m in names if m != "memorization" and (extractor is not None or not M.uses_features([m]))]
    space = extractor.name if extractor is not None and M.uses_features(names) else "pixels"
    key = f"{dataset_key(path)}-r{size}-n{n}-seed{seed}-{space}-{'-'.join(sorted(names))}"
    cache = _floor_cache() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    train = load_real(path, split="train", size=size)
    heldout = load_real(path, split="val", size=size)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 2))
    k = min(n, len(train) // 2)
    first, second = to_unit(train[order[:k]]), to_unit(train[order[k:2 * k]])
    pick = torch.randperm(len(heldout), generator=torch.Generator().manual_seed(seed))[:n]
    floors = {f"floor/{key}": v for key, v in M.evaluate(names, to_unit(heldout[pick]), first, seed=seed,
                                                        extractor=extractor).items() if _floor_value(key, v)}
    floors.update({f"floor_halves/{key}": v for key, v in M.evaluate(names, first, second, seed=seed,
                                                                     extractor=extractor).items()
                   if _floor_value(key, v)})
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(floors))
    tmp.replace(cache)
    return floors


def _floor_value(key: str, value: object) -> bool:
    """A number worth a floor: not a string, and not a metric's cost in seconds."""
    return isinstance(value, float) and not key.endswith("_seconds")


def with_floors(values: dict[str, float], floors: dict[str, float]) -> str:
    """`swd 61.0 (floor 12.1)  msssim 0.290 (floor 0.110)`: every number beside its real floor."""
    parts = []
    for key, value in values.items():
        floor = floors.get(f"floor/{key}")
        parts.append(f"{key} {value:.4g}" + (f" (floor {floor:.4g})" if floor is not None else ""))
    return "  ".join(parts)


class InLoopMetrics:
    def __init__(self, cfg: Config, device: torch.device, cache_dir: Path,
                 class_counts: list[int] | None = None, is_main: bool = True) -> None:
        """`class_counts`: a conditional run's training images per class; generated classes follow them.
        Only the main process (`is_main`, global rank 0) computes the real floors: it alone reports them."""
        mcfg = cfg.metrics
        self.names, self.seed = list(mcfg.names), cfg.seed
        real = load_real(cfg.data.path, split="val", size=cfg.model.resolution)
        n = min(mcfg.n, len(real))
        pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(cfg.seed))[:n]
        mine = M.shard(n)
        self.real = to_unit(real[pick][mine]).to(device)
        self.z = torch.randn(n, cfg.model.nz, generator=torch.Generator().manual_seed(cfg.seed + 1))[mine].to(device)
        self.labels = allocate(n, class_counts)[mine].to(device) if class_counts else None
        self.extractor = M.load_extractor(mcfg.inception_weights, device=device, data=cfg.data.path,
                                          resolution=cfg.model.resolution)
        self.stats = None
        if self.extractor is not None and M.uses_features(self.names):
            key = f"{dataset_key(cfg.data.path)}-r{cfg.model.resolution}-n{n}-seed{cfg.seed}"
            self.stats = M.compute_real_stats(self.real, self.extractor, cache=M.RealStatsCache(cache_dir), key=key)
        self.floors = real_floors(cfg.data.path, self.names, cfg.model.resolution, n, cfg.seed, self.extractor) \
            if is_main else {}

    def __call__(self, generator: torch.nn.Module) -> dict[str, float]:
        fake = generate(generator, self.z, self.labels)
        result = M.evaluate_distributed(self.names, self.real, fake, extractor=self.extractor, real_stats=self.stats,
                                        seed=self.seed)
        return {k: v for k, v in result.items() if isinstance(v, float)}
