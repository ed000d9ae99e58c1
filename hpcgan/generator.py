"""Loading a trained generator for sampling and evaluation, without unpickling anything."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from hpcgan.config import build_config
from hpcgan.models import Generator
from hpcgan.train.checkpoint import MARKER, CheckpointError, CheckpointManager, load_torch


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or the latest complete one of a run folder."""
    path = Path(path)
    if (path / MARKER).exists():
        return path
    latest = CheckpointManager(path / "checkpoints", keep=1).latest()
    if latest is None:
        raise CheckpointError(f"{path}: no complete checkpoint found (expected RUN/checkpoints/step-*/"
                              f"{MARKER}); train first or point at a checkpoint folder")
    return latest


def load_generator(path: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The generator (eval mode) of a run folder's latest checkpoint or of a checkpoint folder."""
    folder = resolve_checkpoint(path)
    cfg = build_config(base=yaml.safe_load((folder / "config.yaml").read_text()))
    weights = load_torch(folder / "model.pt")
    key = "G_ema" if ema and weights.get("G_ema") is not None else "G"
    generator = Generator(cfg.model)
    try:
        generator.load_state_dict(weights[key])
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"{folder / 'model.pt'}: weights do not fit the saved config ({err})") from None
    return generator.to(device).eval()
