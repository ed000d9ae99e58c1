"""Loading a trained generator (and its discriminator) for sampling, evaluation and export, without
unpickling anything."""

from __future__ import annotations

from pathlib import Path

import torch

from hpcgan.models import build_generator, build_models
from hpcgan.train.checkpoint import MODEL_FILE, CheckpointError, load_torch, resolve_checkpoint
from hpcgan.train.run_folder import config_of


def load_generator(path: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The generator (eval mode) of a run folder's latest checkpoint or of a checkpoint folder."""
    folder = resolve_checkpoint(path)
    cfg = config_of(folder)
    weights = load_torch(folder / MODEL_FILE)
    key = "G_ema" if ema and weights.get("G_ema") is not None else "G"
    generator = build_generator(cfg.model)
    try:
        generator.load_state_dict(weights[key])
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"{folder / MODEL_FILE}: weights do not fit the saved config ({err})") from None
    return generator.to(device).eval()


def load_discriminator(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The discriminator (eval mode) of a run folder's latest checkpoint or of a checkpoint folder."""
    folder = resolve_checkpoint(path)
    cfg = config_of(folder)
    discriminator = build_models(cfg.model)[1]
    try:
        discriminator.load_state_dict(load_torch(folder / MODEL_FILE)["D"])
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"{folder / MODEL_FILE}: no discriminator that fits the saved config ({err})") from None
    return discriminator.to(device).eval()
