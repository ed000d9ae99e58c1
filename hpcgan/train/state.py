"""The loop's whole progress in one object, saved as `state.json` in every checkpoint."""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import yaml

from hpcgan.config import Config, ConfigError, to_dict


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (each step updates D, then G)
    images_seen: int = 0  # real images shown to D, summed over ranks
    data: dict[str, Any] = field(default_factory=dict)  # the reader's position
    mlflow_run_id: str | None = None
    world_size: int = 1
    restarts: int = 0  # times this run was resumed from a checkpoint
    best: dict[str, Any] = field(default_factory=dict)  # {"metric", "value", "step"} of best/
    classes: dict[str, int] = field(default_factory=dict)  # conditional: class -> training images, label order
    bad_steps: int = 0  # steps skipped by the guard (non-finite loss or gradient)
    rollbacks: int = 0  # times the guard rolled back to a good checkpoint
    lr_factor: float = 1.0  # the learning rates' factor after those rollbacks

    def state_dict(self) -> str:
        """JSON text: the one checkpoint file a person reads to see where a run stands."""
        return json.dumps(dataclasses.asdict(self), indent=1)

    def load_state_dict(self, text: str) -> None:
        data = json.loads(text)
        for f in dataclasses.fields(self):
            if f.name in data:
                setattr(self, f.name, data[f.name])


class GlobalRNG:
    """This process's global RNG streams as a checkpoint part."""

    def state_dict(self) -> dict[str, Any]:
        return capture_rng()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng(state)


def capture_rng() -> dict[str, Any]:
    """This process's RNG states in a form `torch.load(weights_only=True)` accepts; on CUDA, only the
    current device's (the one this rank uses: another rank owns the others' streams)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else [],
    }


def restore_rng(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if isinstance(states["cuda"], torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class SavedConfig:
    """The resolved config as a checkpoint part: saved as YAML, and loading refuses a checkpoint
    whose model settings differ from this run's (its weights would not fit)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def state_dict(self) -> str:
        return yaml.safe_dump(to_dict(self.cfg), sort_keys=False)

    def load_state_dict(self, text: str) -> None:
        then, now = (yaml.safe_load(text) or {}).get("model", {}), to_dict(self.cfg.model)
        for key, value in now.items():
            if key in then and then[key] != value:
                raise ConfigError(f"model.{key}={value} but checkpoint trained with {then[key]}: "
                                  "use the same model settings or a new --out folder")


def rank_seed(seed: int, rank: int) -> int:
    """Each rank's RNG stream for latents and noise, derived so no two ranks draw the same latents."""
    return seed * 1_000_003 + 7919 * (rank + 1)
