"""Atomic, multi-rank checkpoints: one folder per step, committed by a marker and a rename.

The manager is handed the run's stateful parts once (`register`), each with the file it goes into, and
from then on gathers, writes, commits, loads, prunes and promotes without knowing what the parts are.
Layout of `RUN/checkpoints/step-0000120/` as the trainer registers it:
    model.pt          G, D and EMA weights (global rank 0)
    optim.pt          both optimizers and the loss scaler (global rank 0)
    state.json        the loop's TrainState: step, images seen, data position, MLflow run id, ...
    config.yaml       the resolved config that produced it
    rank-00000.pt     one per rank: RNG states, the reader's position, the augmentation's p and RNG
    COMPLETE          written last; lists every file with its size

Everything is first written into `.tmp-step-0000120/`, fsynced, marked, then renamed into place, so a
job killed at any moment leaves either a complete checkpoint or a temp folder that is ignored and
cleaned up later. Loading always uses `torch.load(weights_only=True)`: no pickle from the run folder.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from hpcgan.config import ConfigError
from hpcgan.train.run_folder import RunFolder

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
STATE_FILE = "state.json"
MODEL_FILE = "model.pt"
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
    """Serialised in memory first: a full disk or quota then fails as an OSError of our own write,
    not as an error deep inside torch's zip writer."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with open(path, "wb") as handle:
        handle.write(buffer.getbuffer())
        handle.flush()
        os.fsync(handle.fileno())


def _write_text(text: str, path: Path) -> None:
    path.write_text(text)
    _fsync_file(path)


def _write(obj: Any, path: Path) -> None:
    """Strings (JSON, YAML) as text, anything else through torch.save; fsynced."""
    if isinstance(obj, str):
        _write_text(obj, path)
    else:
        _write_torch(obj, path)


def _read(path: Path) -> Any:
    if path.suffix in (".json", ".yaml"):
        try:
            return path.read_text()
        except OSError as err:
            raise CheckpointError(f"{path} is unreadable ({err}); "
                                  "move its folder away to resume from the previous one") from None
    return load_torch(path)


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


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


@dataclass
class _Part:
    name: str
    part: Stateful
    file: str  # a shared file (rank 0 writes it) or "" for the per-rank file
    optional: bool  # may be missing (its file or its entry); loading then leaves it as it is


class CheckpointManager:
    """Saves, finds, loads, prunes and promotes the checkpoints of one run; every rank holds one.

    `agree(ok)` returns True on every rank only if `ok` is True on every rank (an all-reduce; the
    identity for one process), so a write that fails on one rank fails the save everywhere without a
    hang. Global rank 0 writes the shared files and commits; each rank writes its own file into the
    shared temp folder.
    """

    def __init__(self, root: Path, *, keep: int, milestones: list[int] = (), rank: int = 0,
                 agree: Callable[[bool], bool] = lambda ok: ok, best: Path | None = None) -> None:
        self.root = Path(root)
        self.keep, self.milestones = keep, set(milestones)
        self.rank, self.agree, self.best = rank, agree, best
        self.expected_bytes = 0  # the owner's estimate of one checkpoint, for errors before the first exists
        self._parts: list[_Part] = []

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def register(self, name: str, part: Stateful, *, file: str, optional: bool = False) -> None:
        """Save `part.state_dict()` under `name` in the shared `file` (`.json`/`.yaml` files hold one part,
        whose state is text); parts load in the order they were registered."""
        self._parts.append(_Part(name, part, file, optional))

    def register_rank(self, name: str, part: Stateful) -> None:
        """Save `part.state_dict()` under `name` in each rank's own file."""
        self._parts.append(_Part(name, part, "", False))

    def _gather(self, overrides: dict[str, Any]) -> dict[str, Any]:
        files: dict[str, Any] = {}
        for p in self._parts:
            if p.file and not self.is_main:
                continue
            file = p.file or rank_file_name(self.rank)
            state = overrides[p.name] if p.name in overrides else p.part.state_dict()
            if file.endswith((".json", ".yaml")):
                files[file] = state
            else:
                files.setdefault(file, {})[p.name] = state
        return files

    # ------------------------------------------------------------------ finding
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

    # ------------------------------------------------------------------ saving
    def save(self, step: int, overrides: dict[str, Any] | None = None) -> Path:
        """Write and commit the registered parts as step `step`; `overrides` replaces a part's state by
        name (e.g. the reader position a step started from). A failed write removes the temp folder,
        leaves every complete checkpoint as it was, and raises CheckpointError naming the path."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        files = self._gather(overrides or {})
        error: OSError | None = None
        if self.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in self.root.glob(".tmp-step-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                if final.exists() and not is_complete(final):
                    shutil.rmtree(final)
                tmp.mkdir()
            except OSError as err:
                error = err
        already = final.exists()  # a step saved twice (e.g. periodic + final) keeps the first copy
        if self.agree(error is None) and not already:
            try:
                for name, obj in files.items():
                    _write(obj, tmp / name)
            except OSError as err:
                error = err
        if self.agree(error is None) and self.is_main:
            try:
                if already:
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    self._commit(step, tmp, final)
            except OSError as err:
                error = err
        if not self.agree(error is None):
            self._fail(step, tmp, error)
        if self.is_main and not already:
            self._prune()
        return final

    def _commit(self, step: int, tmp: Path, final: Path) -> None:
        listing = {p.name: p.stat().st_size for p in tmp.iterdir()}
        _write_text(json.dumps({"step": step, "files": listing}, indent=1), tmp / MARKER)
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(self.root)

    def _fail(self, step: int, tmp: Path, error: OSError | None) -> None:
        needed = max(sum(p.stat().st_size for p in tmp.iterdir()) if tmp.is_dir() else 0, self.expected_bytes)
        latest = self.latest()
        shutil.rmtree(tmp, ignore_errors=True)
        if latest is not None:
            needed = max(needed, sum(json.loads((latest / MARKER).read_text())["files"].values()))
        what = f"{error.strerror or error}" if error is not None else "a write failed on another rank"
        resumable = f"step {int(latest.name[5:])} ({latest}) stays resumable" if latest else "no checkpoint yet"
        raise CheckpointError(f"cannot write checkpoint step {step} into {self.root} ({what}); it needs about "
                              f"{needed / 1e6:.1f} MB free: free space or raise the quota; {resumable}")

    def _prune(self) -> None:
        steps = self.complete_steps()
        doomed = [s for s in steps[:-self.keep] if s not in self.milestones]
        for step in doomed:
            shutil.rmtree(self.root / step_dir_name(step), ignore_errors=True)

    def promote_best(self, folder: Path) -> Path:
        """Copy a complete checkpoint to `best/` (rank 0): staged, then swapped in by renames."""
        assert self.best is not None, "promote_best needs the manager's best/ path"
        staging, old = self.best.with_name(".best-tmp"), self.best.with_name(".best-old")
        for leftover in (staging, old):
            shutil.rmtree(leftover, ignore_errors=True)
        shutil.copytree(folder, staging)
        if self.best.exists():
            self.best.rename(old)
        staging.rename(self.best)
        shutil.rmtree(old, ignore_errors=True)
        return self.best

    # ------------------------------------------------------------------ loading
    def load(self, folder: Path) -> bool:
        """Load every registered part from `folder`, in registration order. Returns False when the
        folder holds no file for this rank (written by fewer processes): per-rank parts stay as they are."""
        loaded: dict[str, Any] = {}
        mine = folder / rank_file_name(self.rank)
        has_rank_file = mine.exists()
        for p in self._parts:
            file = p.file or rank_file_name(self.rank)
            if (not p.file and not has_rank_file) or (p.optional and not (folder / file).exists()):
                continue
            if file not in loaded:
                loaded[file] = _read(folder / file)
            content = loaded[file]
            single = file.endswith((".json", ".yaml"))
            if not single and p.name not in content:
                if p.optional:
                    continue
                raise CheckpointError(f"{folder / file} holds no '{p.name}' state: it is from other settings "
                                      "or another version; use a new --out folder")
            try:
                p.part.load_state_dict(content if single else content[p.name])
            except CheckpointError:
                raise
            except ConfigError as err:
                raise ConfigError(f"{folder}: {err}") from None
            except (KeyError, RuntimeError, ValueError, TypeError) as err:
                first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
                raise CheckpointError(f"{folder / file} does not match this model ('{p.name}': {first}); it is "
                                      "foreign or from other settings: use a new --out folder") from None
        return has_rank_file

    @staticmethod
    def read_state(folder: Path) -> dict[str, Any]:
        try:
            return json.loads((folder / STATE_FILE).read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{folder / STATE_FILE} is unreadable ({err}); "
                                  "move the folder away to resume from the previous one") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given (a step folder or best/), or the latest complete one of a run folder."""
    path = Path(path)
    if (path / MARKER).exists():
        return path
    latest = CheckpointManager(RunFolder(path).checkpoints, keep=1).latest()
    if latest is None:
        raise CheckpointError(f"{path}: no complete checkpoint found (expected RUN/checkpoints/step-*/"
                              f"{MARKER}); train first or point at a checkpoint folder")
    return latest
