"""Feature networks for FID, KID and the k-NN metrics, loaded from local TorchScript files only.

Weights are never downloaded: clusters holding patient data are often offline, and a silently
fetched network would make numbers irreproducible. Any network that maps images to vectors plugs in
through `FeatureExtractor`; `TorchScriptFeatures` covers both the NVlabs Inception export
(pt_inception-2015-12-05) and generic exports such as a RadImageNet backbone (`encoder.py` trains an
offline one).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

WEIGHTS_ENV = "HPCGAN_INCEPTION_WEIGHTS"
InputRange = Literal["0-255", "0-1", "-1-1"]
_OPTIONS = {"input_size", "input_range", "return_features", "in_channels"}


class FeatureWeightsError(RuntimeError):
    """A feature-network file that cannot be used; the one-line message names the file."""


class FeatureExtractor(Protocol):
    """Optional attributes the metrics read when present: `description` (how the space was made, for
    reports) and `metric_suffix` (appended to FID/KID keys, e.g. "_ssl")."""

    name: str  # identifies the feature space (weights + preprocessing); keys the real-stats cache
    dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) in [-1, 1] -> (N, dim) float."""
        ...


def extract(extractor: FeatureExtractor, images: torch.Tensor) -> torch.Tensor:
    """Call an extractor without autograd and check it kept its promise about the shape."""
    with torch.inference_mode():
        feats = extractor(images)
    if feats.shape != (images.shape[0], extractor.dim):
        raise ValueError(f"feature extractor {extractor.name} returned {tuple(feats.shape)}, "
                         f"expected ({images.shape[0]}, {extractor.dim})")
    return feats.float()


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _file_digest(path: Path, extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:10]


class TorchScriptFeatures:
    """A TorchScript feature network fed the way the standard FID code feeds Inception.

    Grayscale is repeated to `in_channels`, then resized bilinearly to `input_size` (as pytorch-fid
    and the NVlabs file do). `input_range="0-255"` quantises to integer levels first, because the
    reference pipeline measures uint8 images; "0-1" and "-1-1" pass floats for generic exports.
    `return_features=True` calls `module(x, return_features=True)` (the NVlabs signature, giving the
    2048-d pool features instead of logits); False calls `module(x)`.
    """

    def __init__(self, path: str | Path, *, input_size: int = 299, input_range: InputRange = "0-255",
                 return_features: bool = True, in_channels: int = 3, device: torch.device | str = "cpu",
                 batch_size: int = 64) -> None:
        if input_range not in ("0-255", "0-1", "-1-1"):
            raise ValueError(f"input_range={input_range!r}: must be '0-255', '0-1' or '-1-1'")
        self.path = Path(path)
        if not self.path.is_file():
            raise FeatureWeightsError(f"feature network file {self.path} does not exist (or is not a file)")
        self.input_size, self.input_range = input_size, input_range
        self.return_features, self.in_channels = return_features, in_channels
        self.device, self.batch_size = torch.device(device), batch_size
        try:
            with warnings.catch_warnings():  # deprecated in torch 2.x; the NVlabs file exists only as TorchScript
                warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", DeprecationWarning)
                self.module = torch.jit.load(str(self.path), map_location=self.device).eval()
        except Exception as err:  # torch raises RuntimeError/ValueError/zipfile errors for bad files
            raise FeatureWeightsError(f"{self.path} is not a TorchScript file torch.jit.load can read "
                                      f"({_first_line(err)})") from None
        options = json.dumps([input_size, input_range, return_features, in_channels])
        self.name = f"{self.path.stem}-{_file_digest(self.path, options)}"
        try:
            probe = self(torch.zeros(1, 1, input_size, input_size, device=self.device))
        except Exception as err:
            raise FeatureWeightsError(
                f"{self.path}: calling the module on a [1, {in_channels}, {input_size}, {input_size}] batch "
                f"with return_features={return_features} failed ({_first_line(err)}); set the options in "
                f"{self.path}.json") from None
        self.dim = probe.shape[1]

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        if self.input_range == "0-255":
            x = ((x + 1) * 127.5).round().clamp(0, 255)
        elif self.input_range == "0-1":
            x = (x + 1) * 0.5
        if x.shape[1] != self.in_channels:
            x = x.expand(-1, self.in_channels, -1, -1)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        out = self.module(x, return_features=True) if self.return_features else self.module(x)
        return out.flatten(1).float()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            parts = [self._forward(images[i:i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        return torch.cat(parts).to(images.device)


class PixelProjection:
    """A fixed Gaussian random projection of pixels: a feature space that needs no weights.

    By Johnson-Lindenstrauss it keeps pixel L2 distances within a few percent, so k-NN manifolds
    built on it are pixel-space manifolds at a fraction of the cost; the fixed seed makes values
    comparable across runs.
    """

    def __init__(self, dim: int = 256, seed: int = 0) -> None:
        self.dim, self.seed = dim, seed
        self.name = f"pixel-projection-{dim}-s{seed}"
        self._matrix: torch.Tensor | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(1).float()
        if self._matrix is None or self._matrix.shape[0] != flat.shape[1] or self._matrix.device != flat.device:
            gen = torch.Generator().manual_seed(self.seed)  # drawn on the CPU: the same matrix on any device
            self._matrix = (torch.randn(flat.shape[1], self.dim, generator=gen) / self.dim ** 0.5).to(flat.device)
        return flat @ self._matrix


def resolve_weights(path: str = "") -> str | None:
    """The config value wins; the environment variable is the fallback; None means no network."""
    return path or os.environ.get(WEIGHTS_ENV) or None


def load_torchscript(path: str = "", device: torch.device | str = "cpu") -> TorchScriptFeatures | None:
    """Load `metrics.inception_weights` (or $HPCGAN_INCEPTION_WEIGHTS); None when neither is set.

    Options for non-NVlabs exports live in a sidecar `<file>.json`, e.g.
    {"input_size": 224, "input_range": "-1-1", "return_features": false}, so the config needs only
    the path.
    """
    resolved = resolve_weights(path)
    if resolved is None:
        return None
    sidecar = Path(f"{resolved}.json")
    options = {}
    if sidecar.is_file():
        try:
            options = json.loads(sidecar.read_text())
        except json.JSONDecodeError as err:
            raise FeatureWeightsError(f"{sidecar} is not valid JSON ({err})") from None
        if not isinstance(options, dict) or set(options) - _OPTIONS:
            raise FeatureWeightsError(f"{sidecar}: expected an object with keys among {sorted(_OPTIONS)}")
    return TorchScriptFeatures(resolved, device=device, **options)
