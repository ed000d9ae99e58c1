"""Does a feature space see what it should? Disturbance curves and a copy audit on real slices.

This is how FID's authors validated Inception features (Heusel et al. 2017) and how later work checks
other spaces: held-out real slices are split into two halves, one half is degraded at increasing
strength, and the distance to the clean half must grow monotonically with the strength, starting from
the real-vs-real floor at strength 0. Mode dropping removes a share of one cluster of slices (k-means
on downsampled pixels, independent of the space under test) and refills the set from the other
clusters, so only the composition changes. On the memorization side, copies of training slices must
be flagged by nearest-neighbour audits while unseen real slices are not.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch
import torch.nn.functional as F

from hpcgan.metrics.features import FeatureExtractor, extract
from hpcgan.metrics.frechet import fid_from_features, kid_from_features
from hpcgan.metrics.memorization import memorization_audit

# Strengths per degradation; 0 is the real-vs-real floor. Noise sigma and intensity shift in [-1, 1]
# units, blur sigma in pixels at 64 px (scaled with the image size), drop = share of one cluster removed.
STRENGTHS: dict[str, tuple[float, ...]] = {
    "noise": (0.0, 0.05, 0.1, 0.2, 0.4),
    "blur": (0.0, 0.5, 1.0, 1.5, 2.0),
    "shift": (0.0, 0.1, 0.2, 0.3, 0.4),
    "drop": (0.0, 0.25, 0.5, 0.75, 1.0),
}


@dataclass(frozen=True)
class Disturbance:
    degradation: str
    strength: float
    fd: float
    kid: float


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W) images with reflected borders; sigma in pixels."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(x)
    y = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    return F.conv2d(F.conv2d(y, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))


def cluster_labels(images: torch.Tensor, k: int = 4, *, seed: int = 0, iters: int = 30) -> torch.Tensor:
    """k-means (k-means++ start, Lloyd steps) on 8x8 average-pooled pixels; (N,) labels."""
    x = F.adaptive_avg_pool2d(images.float().cpu(), 8).flatten(1).double()
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(len(x), (1,), generator=gen)]
    while len(centres) < k:
        d2 = torch.cdist(x, centres).min(dim=1).values ** 2
        centres = torch.cat([centres, x[torch.multinomial(d2 / d2.sum(), 1, generator=gen)]])
    for _ in range(iters):
        labels = torch.cdist(x, centres).argmin(dim=1)
        centres = torch.stack([x[labels == c].mean(0) if (labels == c).any() else centres[c] for c in range(k)])
    return torch.cdist(x, centres).argmin(dim=1)


def drop_mode(images: torch.Tensor, labels: torch.Tensor, cluster: int, share: float, *,
              seed: int = 0) -> torch.Tensor:
    """`share` of the slices of `cluster` replaced by random slices of the other clusters; same N."""
    gen = torch.Generator().manual_seed(seed)
    members = (labels == cluster).nonzero()[:, 0]
    others = (labels != cluster).nonzero()[:, 0]
    dropped = members[torch.randperm(len(members), generator=gen)[:round(share * len(members))]]
    out = images.clone()
    out[dropped] = images[others[torch.randint(len(others), (len(dropped),), generator=gen)]]
    return out


def degrade(images: torch.Tensor, kind: str, strength: float, *, seed: int = 0) -> torch.Tensor:
    """Noise, blur or intensity shift of (N, 1, H, W) slices in [-1, 1]; strength 0 returns them unchanged."""
    if kind == "noise":
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)).to(images)
        return (images + strength * noise).clamp(-1, 1)
    if kind == "blur":
        return gaussian_blur(images, strength * images.shape[-1] / 64) if strength > 0 else images
    if kind == "shift":
        return (images + strength).clamp(-1, 1)
    raise ValueError(f"unknown degradation {kind!r}; choose from noise, blur, shift (drop: use drop_mode)")


def disturbance_curves(extractor: FeatureExtractor, heldout: torch.Tensor, *,
                       strengths: dict[str, tuple[float, ...]] = STRENGTHS, clusters: int = 4, repeats: int = 5,
                       seed: int = 0) -> list[Disturbance]:
    """FD and KID between one clean half of `heldout` and the other half degraded at each strength,
    averaged over `repeats` random half-splits (a single split's real-vs-real floor varies by ~20%).

    Mode dropping ("drop") removes slices of the largest of `clusters` k-means clusters of the degraded half.
    """
    if len(heldout) < 8:
        raise ValueError(f"disturbance curves need at least 8 held-out slices, got {len(heldout)}")
    sums: dict[tuple[str, float], torch.Tensor] = {}
    for r in range(repeats):
        order = torch.randperm(len(heldout), generator=torch.Generator().manual_seed(seed + r))
        clean, other = heldout[order[:len(order) // 2]], heldout[order[len(order) // 2:]]
        reference = extract(extractor, clean)
        labels = cluster_labels(other, clusters, seed=seed + r)
        largest = int(labels.bincount(minlength=clusters).argmax())
        for kind, levels in strengths.items():
            for strength in levels:
                if kind == "drop":
                    images = drop_mode(other, labels, largest, strength, seed=seed + r)
                else:
                    images = degrade(other, kind, strength, seed=seed + r)
                feats = extract(extractor, images)
                values = torch.tensor([fid_from_features(reference, feats),
                                       kid_from_features(reference, feats, seed=seed + r)], dtype=torch.float64)
                sums[kind, strength] = sums.get((kind, strength), 0) + values
    return [Disturbance(kind, strength, *(float(v) / repeats for v in total))
            for (kind, strength), total in sums.items()]


def monotone(rows: list[Disturbance], key: str = "fd") -> dict[str, bool]:
    """Per degradation: does `key` strictly increase with the strength?"""
    out = {}
    for kind in dict.fromkeys(r.degradation for r in rows):
        values = [getattr(r, key) for r in sorted((r for r in rows if r.degradation == kind), key=lambda r: r.strength)]
        out[kind] = all(b > a for a, b in zip(values, values[1:]))
    return out


def _nearest(queries: torch.Tensor, train: torch.Tensor, block: int = 1024) -> torch.Tensor:
    return torch.cat([torch.cdist(queries[s:s + block].double(), train.double()).min(dim=1).values
                      for s in range(0, len(queries), block)])


def copy_audit(extractor: FeatureExtractor, train: torch.Tensor, heldout: torch.Tensor, *,
               quantile: float = 0.01, shift_px: int = 2, noise: float = 0.02, seed: int = 0) -> dict[str, float]:
    """Share of slices flagged as copies of training slices, by the pixel memorization audit and by
    the nearest training neighbour in feature space (closer than all but `quantile` of held-out slices).

    Groups: "novel" (held-out slices, the false-alarm rate), "copies" (training slices verbatim) and
    "shifted" (training slices moved by `shift_px` pixels plus Gaussian noise of sigma `noise`).
    """
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(heldout), generator=gen)
    calibration, novel = heldout[order[:len(order) // 2]], heldout[order[len(order) // 2:]]
    copies = train[torch.randperm(len(train), generator=gen)[:len(novel)]]
    shifted = (copies.roll(shifts=(shift_px, shift_px), dims=(-2, -1))
               + noise * torch.randn(copies.shape, generator=gen).to(copies)).clamp(-1, 1)
    groups = {"novel": novel, "copies": copies, "shifted": shifted}
    pixel = memorization_audit(train, torch.cat(list(groups.values())), heldout=calibration, quantile=quantile)
    train_feats = extract(extractor, train)
    threshold = _nearest(extract(extractor, calibration), train_feats).quantile(quantile)
    out, start = {}, 0
    for name, images in groups.items():
        out[f"pixel_{name}"] = float(pixel.flagged[start:start + len(images)].double().mean())
        out[f"feature_{name}"] = float((_nearest(extract(extractor, images), train_feats) < threshold).double().mean())
        start += len(images)
    return out


def markdown_table(rows: list[Disturbance]) -> str:
    """Degradation x strength -> FD, KID, as a Markdown table."""
    lines = ["| degradation | strength | FD | KID |", "|---|---:|---:|---:|"]
    lines += [f"| {r.degradation} | {r.strength:g} | {r.fd:.4g} | {r.kid:.4g} |" for r in rows]
    return "\n".join(lines)
