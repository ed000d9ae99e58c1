"""Metrics over several processes with exactly the values of one process.

Each rank generates and featurises a contiguous share of the items (`shard`), the shares are
gathered in rank order to rank 0 only, and rank 0 computes the metrics on the reassembled sets (and
the real statistics, once) and broadcasts the result. Only the expensive, embarrassingly parallel
part (generation, feature network) is split; the metric arithmetic sees the same inputs in the same order as a single process, so the
values agree to float rounding of the feature network. For that, draw latents for the global set
and slice them: `z = torch.randn(n, nz, generator=torch.Generator().manual_seed(seed))[shard(n)]`.

Works with any backend whose tensors the caller passes (CPU for gloo, CUDA for NCCL); without an
initialised process group everything degrades to the single-process path.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist

from hpcgan.metrics.cache import RealStatsCache
from hpcgan.metrics.features import FeatureExtractor, extract
from hpcgan.metrics.registry import Result, evaluate, get, uses_features
from hpcgan.metrics.stats import RealStats

Group = dist.ProcessGroup | None


def _rank_world(group: Group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard(n: int, group: Group = None) -> slice:
    """This rank's contiguous share of n items; shares differ in size by at most one."""
    rank, world = _rank_world(group)
    return slice(rank * n // world, (rank + 1) * n // world)


def _main(group: Group) -> int:
    """The global rank of `group`'s rank 0."""
    return dist.get_global_rank(group, 0) if group is not None else 0


def gather_to_main(local: torch.Tensor, group: Group = None) -> torch.Tensor | None:
    """Every rank's rows in rank order on rank 0, None on the others (shares may differ in length)."""
    rank, world = _rank_world(group)
    if world == 1:
        return local
    size = torch.tensor([len(local)], device=local.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s) for s in sizes]
    padded = local.new_zeros((max(counts), *local.shape[1:]))
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    dist.gather(padded, parts, dst=_main(group), group=group)
    return torch.cat([part[:count] for part, count in zip(parts, counts)]) if rank == 0 else None


def _main_says(flag: bool, device: torch.device, group: Group) -> bool:
    """Rank 0's `flag`, on every rank."""
    if _rank_world(group)[1] == 1:
        return flag
    box = torch.tensor([int(flag)], device=device)
    dist.broadcast(box, src=_main(group), group=group)
    return bool(box.item())


def compute_real_stats(real_local: torch.Tensor, extractor: FeatureExtractor, *,
                       cache: RealStatsCache | None = None, key: str = "", group: Group = None) -> RealStats | None:
    """Real-set features and Gaussian fit on rank 0 (None on the others, which only featurise their
    share): from `cache` when rank 0 finds it there, else computed and cached by rank 0. Rank 0's hit or
    miss is sent to all, so they featurise together or not at all."""
    rank, _ = _rank_world(group)
    stats = cache.load(key, extractor) if cache is not None and rank == 0 else None
    if _main_says(stats is not None, real_local.device, group):
        return stats
    features = gather_to_main(extract(extractor, real_local), group)
    if rank != 0:
        return None
    stats = RealStats.from_features(features)
    if cache is not None:
        cache.save(key, extractor, stats)
    return stats


def evaluate_distributed(names: Iterable[str], real_local: torch.Tensor, fake_local: torch.Tensor, *,
                         extractor: FeatureExtractor | None = None, seed: int = 0,
                         out_dir: str | Path | None = None, real_stats: RealStats | None = None,
                         heldout: torch.Tensor | None = None, group: Group = None) -> Result:
    """`evaluate` on the union of every rank's shares; all ranks call it and all get the result.
    `real_stats` counts on rank 0 (what `compute_real_stats` returns there)."""
    names = list(names)
    for name in names:  # fail on every rank before any collective, never on rank 0 alone
        get(name)
    rank, world = _rank_world(group)
    real_local, fake_local = real_local.detach(), fake_local.detach()
    fake_features = None
    if extractor is not None and uses_features(names):
        fake_features = gather_to_main(extract(extractor, fake_local), group)
        if _main_says(real_stats is None, real_local.device, group):
            real_stats = compute_real_stats(real_local, extractor, group=group)
    real, fake = gather_to_main(real_local, group), gather_to_main(fake_local, group)
    result: Result | None = None
    error: Exception | None = None
    if rank == 0:
        try:
            result = evaluate(names, real, fake, extractor=extractor, seed=seed, out_dir=out_dir,
                              real_stats=real_stats, fake_features=fake_features, heldout=heldout)
        except Exception as err:  # reported to every rank below instead of leaving them waiting
            error = err
    if world > 1:
        # a plain string for a failure: not every exception survives pickling
        box: list[Result | str | None] = [result if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(box, src=_main(group), group=group)
        if rank != 0:
            if isinstance(box[0], str):
                raise RuntimeError(f"metrics failed on rank 0: {box[0]}")
            result = box[0]
    if error is not None:
        raise error
    assert result is not None
    return result
