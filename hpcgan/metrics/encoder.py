"""An offline feature space for FD, KID, precision/recall and density/coverage: a small CNN trained here.

FID needs an Inception file most users do not have, and ImageNet features know little about MRI. This
encoder needs no download: it is trained self-supervised (SimCLR, Chen et al. 2020) on the data set's
own training slices, two views per slice pulled together by the NT-Xent loss. The views differ only in
pose (small rotation, zoom, translation, left-right flip). Intensity, noise and blur augmentations,
standard in SimCLR, are left out on purpose: they teach exactly the invariances a quality metric must
not have (with them, FD did not see noise or intensity shifts of 0.1). The features are the pooled
backbone output, not the projection head's, which keeps more of what the loss does not need.

Training is seeded and runs in minutes on a CPU; the file is cached by data fingerprint, resolution,
seed and settings, and the extractor's name carries a hash of the weights, so numbers in this space
name exactly the encoder that produced them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpcgan.data import DataError, load_split, shards
from hpcgan.data.pixels import to_unit
from hpcgan.metrics.features import FeatureWeightsError

FORMAT = "hpcgan-ssl-encoder/1"
CACHE_ENV = "HPCGAN_CACHE"


@dataclass(frozen=True)
class EncoderSettings:
    """Architecture, optimisation and augmentation of the encoder; all of it keys the cache."""

    steps: int = 600
    batch_size: int = 96  # slices per step; each gives two views
    lr: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.2
    width: int = 16  # channels of the first block; doubled per block, the embedding has 8 * width
    rotate_deg: float = 8.0
    scale: float = 0.08  # zoom 1 +- scale
    translate: float = 0.05  # fraction of the image side
    flip: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2 or self.width < 1:
            raise ValueError(f"encoder settings need steps >= 1, batch_size >= 2 and width >= 1, got steps="
                             f"{self.steps}, batch_size={self.batch_size}, width={self.width}")

    @property
    def dim(self) -> int:
        return 8 * self.width


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """Four stride-2 blocks (width, 2, 4, 8 x width channels) and a global average pool."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(_block(1, width), _block(width, 2 * width), _block(2 * width, 4 * width),
                                    _block(4 * width, 8 * width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).mean(dim=(2, 3))


def _projection_head(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim // 2))


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss for 2N embeddings where rows i and i + N are views of one slice."""
    z = F.normalize(z, dim=1)
    n = len(z) // 2
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, target)


def _uniform(n: int, half_width: float, gen: torch.Generator) -> torch.Tensor:
    return (2 * torch.rand(n, generator=gen) - 1) * half_width


def augment(x: torch.Tensor, s: EncoderSettings, gen: torch.Generator) -> torch.Tensor:
    """One random view of each (N, 1, H, W) slice in [-1, 1]: rotated, zoomed, shifted, maybe mirrored."""
    n = len(x)
    angle = _uniform(n, math.radians(s.rotate_deg), gen)
    zoom = 1 + _uniform(n, s.scale, gen)
    mirror = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if s.flip else torch.ones(n)
    shift = _uniform(2 * n, 2 * s.translate, gen).view(n, 2)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * mirror, -sin, shift[:, 0]], 1),
                         torch.stack([sin * mirror, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # in [0, 1] so that the zero padding is the black background
    return F.grid_sample((x + 1) / 2, grid, mode="bilinear", padding_mode="zeros", align_corners=False) * 2 - 1


def data_fingerprint(shard_dir: str | Path) -> str:
    """The data set's identity in cache keys: the shard manifest's hash."""
    if not shards.is_shard_dir(Path(shard_dir)):
        raise DataError(f"{shard_dir}: not a shard folder (no {shards.MANIFEST}); create one with hpcgan prepare")
    return shards.fingerprint(Path(shard_dir))


def default_cache_dir() -> Path:
    """$HPCGAN_CACHE/features, else $XDG_CACHE_HOME/hpcgan/features, else ~/.cache/hpcgan/features."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hpcgan"
    return Path(root) / "features"


def _training_resolution(shard_dir: Path, resolution: int | None) -> int:
    sizes = [int(s) for s in shards.read_manifest(shard_dir)["sizes"]]
    if resolution is None:
        return sizes[0]
    if resolution not in sizes:
        raise DataError(f"{shard_dir}: shards hold sizes {sizes}, not {resolution}; pick one of them "
                         f"or run hpcgan prepare --size {resolution}")
    return resolution


def _key(seed: int, settings: EncoderSettings) -> dict[str, Any]:
    return {"seed": seed, "settings": asdict(settings)}


def encoder_path(shard_dir: str | Path, *, resolution: int | None = None, seed: int = 0,
                 settings: EncoderSettings = EncoderSettings(), cache_dir: str | Path | None = None) -> Path:
    """Where the encoder for this data, resolution, seed and settings lives in the cache."""
    res = _training_resolution(Path(shard_dir), resolution)
    digest = hashlib.sha256(json.dumps(_key(seed, settings), sort_keys=True).encode()).hexdigest()[:10]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"ssl-{data_fingerprint(shard_dir)}-r{res}-{digest}.pt"


def _weights_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:10]


def _train(images: torch.Tensor, settings: EncoderSettings, seed: int,
           progress: Callable[[str], None] | None) -> tuple[Encoder, float]:
    """Encoder trained on uint8 (N, 1, H, W) slices; also the mean loss of the last tenth of the steps."""
    with torch.random.fork_rng(devices=[]):  # initialisation draws from the global RNG; leave the caller's alone
        torch.manual_seed(seed)
        encoder, head = Encoder(settings.width).to(memory_format=torch.channels_last), _projection_head(settings.dim)
    gen = torch.Generator().manual_seed(seed)
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = max(1, settings.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * i / settings.steps)))
    batch = min(settings.batch_size, len(images))
    encoder.train()
    head.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(settings.steps):
        x = to_unit(images[torch.randperm(len(images), generator=gen)[:batch]])
        views = torch.cat([augment(x, settings, gen), augment(x, settings, gen)])
        views = views.contiguous(memory_format=torch.channels_last)  # ~1.6x faster convolutions on CPU
        loss = nt_xent(head(encoder(views)), settings.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress is not None and ((step + 1) % max(1, settings.steps // 10) == 0 or step + 1 == settings.steps):
            progress(f"step {step + 1}/{settings.steps}  loss {losses[-1]:.3f}  {time.perf_counter() - start:.0f}s")
    tail = losses[-max(1, len(losses) // 10):]
    return encoder.eval(), sum(tail) / len(tail)


def _save(path: Path, encoder: Encoder, meta: dict[str, Any]) -> None:
    """Atomically: concurrent jobs sharing the cache never read a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"format": FORMAT, "meta": meta, "state_dict": encoder.state_dict()}, tmp)
    os.replace(tmp, path)


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not path.is_file():
        raise FeatureWeightsError(f"encoder file {path} does not exist; train one with hpcgan features --data SHARDS")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, pickle and unpickler errors all mean the same: not our file
        raise FeatureWeightsError(f"{path} is not an encoder file torch.load can read ({type(err).__name__}); "
                                  "retrain it with hpcgan features") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FeatureWeightsError(f"{path} is not a {FORMAT} file; retrain it with hpcgan features")
    return data["meta"], data["state_dict"]


def train_features(shard_dir: str | Path, *, out: str | Path | None = None, seed: int = 0,
                   steps: int | None = None, batch_size: int | None = None, resolution: int | None = None,
                   settings: EncoderSettings | None = None, cache_dir: str | Path | None = None,
                   progress: Callable[[str], None] | None = None) -> Path:
    """Train the encoder on the training split of `shard_dir`, or find it already trained; its path.

    `out` (default: the cache, see `encoder_path`) is reused when it holds an encoder for the same data,
    resolution, seed and settings. `steps` and `batch_size` override those of `settings`.
    """
    settings = settings or EncoderSettings()
    settings = replace(settings, steps=settings.steps if steps is None else steps,
                       batch_size=settings.batch_size if batch_size is None else batch_size)
    shard_dir = Path(shard_dir)
    res = _training_resolution(shard_dir, resolution)
    fingerprint = data_fingerprint(shard_dir)
    path = Path(out) if out is not None else encoder_path(shard_dir, resolution=res, seed=seed, settings=settings,
                                                          cache_dir=cache_dir)
    wanted = {"fingerprint": fingerprint, "resolution": res, **_key(seed, settings)}
    if path.is_file():
        try:
            meta, _ = _read(path)
        except FeatureWeightsError:
            meta = {}
        if all(meta.get(k) == v for k, v in wanted.items()):
            return path
    images = load_split(shard_dir, "train", res)
    if len(images) < 2:
        raise DataError(f"{shard_dir}: the train split holds {len(images)} slices; the encoder needs at least 2 "
                         "(re-run hpcgan prepare with a smaller --val-frac)")
    start = time.perf_counter()
    encoder, loss = _train(images, settings, seed, progress)
    meta = {**wanted, "dim": settings.dim, "train_images": len(images), "final_loss": loss,
            "seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads(),
            "torch": str(torch.__version__)}
    _save(path, encoder, meta)
    return path


def find_encoder(shard_dir: str | Path, resolution: int | None = None,
                 cache_dir: str | Path | None = None) -> Path | None:
    """A cached encoder for this shard folder and resolution: the default settings' one when it was
    trained, else the most recently trained one; None when there is none (or `shard_dir` is no shard folder)."""
    if not shards.is_shard_dir(Path(shard_dir)):
        return None
    default = encoder_path(shard_dir, resolution=resolution, cache_dir=cache_dir)
    if default.is_file():
        return default
    candidates = sorted(default.parent.glob(default.name.rsplit("-", 1)[0] + "-*.pt"),
                        key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


class SSLFeatures:
    """The trained encoder as a `FeatureExtractor`: (N, 1, H, W) in [-1, 1] -> (N, 8 * width).

    Images of another size are resized (bilinear, antialiased) to the training resolution. Metrics in
    this space carry the suffix "_ssl" ("fd_ssl", "kid_ssl") so they are never mistaken for
    Inception FID/KID, and `description` names the encoder, its data and its training.
    """

    metric_suffix = "_ssl"

    def __init__(self, path: str | Path, *, device: torch.device | str = "cpu", batch_size: int = 256) -> None:
        self.path = Path(path)
        self.meta, state = _read(self.path)
        try:
            settings = EncoderSettings(**{f.name: self.meta["settings"][f.name] for f in fields(EncoderSettings)})
            self.module = Encoder(settings.width)
            self.module.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise FeatureWeightsError(f"{self.path}: weights or settings do not fit this hpcgan's encoder "
                                      f"({type(err).__name__}); retrain it with hpcgan features") from None
        self.device, self.batch_size = torch.device(device), batch_size
        self.module = self.module.to(self.device, memory_format=torch.channels_last).eval()
        self.resolution, self.dim = int(self.meta["resolution"]), settings.dim
        self.name = f"ssl-enc-{_weights_digest(state)}"
        self.description = (f"{self.name} (dim {self.dim}, trained on {self.meta['fingerprint']} at "
                            f"{self.resolution} px, {settings.steps} steps, seed {self.meta['seed']})")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        parts = []
        with torch.inference_mode():
            for s in range(0, len(images), self.batch_size):
                x = images[s:s + self.batch_size].to(self.device, torch.float32)
                if x.shape[-2:] != (self.resolution, self.resolution):
                    x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                                      align_corners=False, antialias=True)
                parts.append(self.module(x.contiguous(memory_format=torch.channels_last)))
        return torch.cat(parts).to(images.device) if parts else images.new_zeros(0, self.dim)
