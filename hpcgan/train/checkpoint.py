"""Atomic, multi-rank checkpoints: one folder per step, committed by a marker and a rename.

Layout of `RUN/checkpoints/step-0000120/`:
    model.pt          G, D and EMA weights (global rank 0)
    optim.pt          both optimizers and the loss scaler (global rank 0)
    state.json        the loop's TrainState: step, images seen, data position, MLflow run id, ...
    config.yaml       the resolved config that produced it
    rank-00000.pt     one per rank: python, numpy, torch and cuda RNG states, the reader's position
    COMPLETE          written last; lists every file with its size

Everything is first written into `.tmp-step-0000120/`, fsynced, marked, then renamed into place, so a
job killed at any moment leaves either a complete checkpoint or a temp folder that is ignored and
cleaned up later. Loading always uses `torch.load(weights_only=True)`: no pickle from the run folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder/file and what to do."""


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def rank_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_torch(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    _fsync_file(path)


def _write_text(text: str, path: Path) -> None:
    path.write_text(text)
    _fsync_file(path)


def is_complete(folder: Path) -> bool:
    """A folder counts only if its marker exists and every listed file has its recorded size."""
    try:
        listing = json.loads((folder / MARKER).read_text())
        return all((folder / name).stat().st_size == size for name, size in listing["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint folder is incomplete; "
                              "move the folder away to resume from the previous one") from None
    except Exception as err:  # noqa: BLE001 - corrupt or foreign files fail in many ways
        raise CheckpointError(f"{path} cannot be loaded safely ({type(err).__name__}: {err}); "
                              "it is damaged or not an hpcgan checkpoint: move its folder away") from None


class CheckpointManager:
    """Saves, finds and prunes the checkpoints of one run; every rank holds one.

    `barrier` synchronises all ranks (a no-op for one process); global rank 0 writes the shared files
    and commits, each rank writes its own RNG file into the shared temp folder.
    """

    def __init__(self, root: Path, *, keep: int, milestones: list[int] = (), rank: int = 0,
                 barrier: Callable[[], None] = lambda: None) -> None:
        self.root = Path(root)
        self.keep, self.milestones = keep, set(milestones)
        self.rank, self.barrier = rank, barrier

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def complete_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        steps = []
        for child in self.root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and child.is_dir():
                if is_complete(child):
                    steps.append(int(match.group(1)))
                else:
                    log.warning("ignoring incomplete checkpoint %s (no valid %s marker)", child, MARKER)
        return sorted(steps)

    def latest(self) -> Path | None:
        steps = self.complete_steps()
        return self.root / step_dir_name(steps[-1]) if steps else None

    def save(self, step: int, shared: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Write one checkpoint. `shared` maps file names to objects (rank 0's); `.json`/`.yaml`
        entries are strings written as text, anything else goes through torch.save."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        self.barrier()
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists() and not is_complete(final):
                shutil.rmtree(final)
            tmp.mkdir()
        self.barrier()
        already = final.exists()  # a step saved twice (e.g. periodic + final) keeps the first copy
        if not already:
            _write_torch(rank_state, tmp / rank_file_name(self.rank))
            if self.is_main:
                for name, obj in shared.items():
                    if isinstance(obj, str):
                        _write_text(obj, tmp / name)
                    else:
                        _write_torch(obj, tmp / name)
        self.barrier()
        if self.is_main:
            if already:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                files = {p.name: p.stat().st_size for p in tmp.iterdir()}
                _write_text(json.dumps({"step": step, "files": files}, indent=1), tmp / MARKER)
                _fsync_dir(tmp)
                os.rename(tmp, final)
                _fsync_dir(self.root)
                self._prune()
        self.barrier()
        return final

    def _prune(self) -> None:
        steps = self.complete_steps()
        doomed = [s for s in steps[:-self.keep] if s not in self.milestones]
        for step in doomed:
            shutil.rmtree(self.root / step_dir_name(step), ignore_errors=True)

    @staticmethod
    def read_state(folder: Path) -> dict[str, Any]:
        try:
            return json.loads((folder / "state.json").read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{folder / 'state.json'} is unreadable ({err}); "
                                  "move the folder away to resume from the previous one") from None

    def read_rank_state(self, folder: Path) -> dict[str, Any] | None:
        """This rank's own state (RNG, reader position), or None when the checkpoint came from fewer processes."""
        path = folder / rank_file_name(self.rank)
        return load_torch(path) if path.exists() else None
