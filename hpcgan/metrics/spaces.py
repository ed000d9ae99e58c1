"""Which feature space an evaluation gets: the one place that decides, so trainer and CLI agree.

A configured TorchScript network (Inception, RadImageNet, ...) wins; otherwise the offline encoder
trained for the data set (`hpcgan features`), when one is in the cache; otherwise none, and the
feature metrics report themselves as skipped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hpcgan.metrics.encoder import SSLFeatures, find_encoder
from hpcgan.metrics.features import FeatureExtractor, load_torchscript, resolve_weights


def load_extractor(path: str = "", device: torch.device | str = "cpu", *, data: str | Path | None = None,
                   resolution: int | None = None, cache_dir: str | Path | None = None) -> FeatureExtractor | None:
    """`metrics.inception_weights` (or $HPCGAN_INCEPTION_WEIGHTS) when set; else the cached offline
    encoder for the shard folder `data` at `resolution` (default: the shards' first size); else None.
    TorchScript options come from the file's sidecar JSON (see `load_torchscript`).
    """
    if resolve_weights(path) is not None:
        return load_torchscript(path, device)
    if data is None:
        return None
    found = find_encoder(data, resolution, cache_dir)
    return SSLFeatures(found, device=device) if found is not None else None
