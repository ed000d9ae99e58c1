"""Atomic, multi-rank checkpoints: one folder per step, committed by a marker and a rename.

The manager is handed the run's stateful parts once (`register`), each with the file it goes into, and
from then on gathers, writes, commits, loads, prunes and promotes without knowing what the parts are.
Layout of `RUN/checkpoints/step-0000120/` as the trainer registers it:
    model.pt          G, D and EMA weights (global rank 0)
    optim.pt          both optimizers and the loss scaler (global rank 0)
    state.json        the loop's TrainState: step, images seen, data position, MLflow run id, ...
    config.yaml       the resolved config that produced it
    rank-00000.pt     one per rank: RNG states, the reader's position, the augmentation's p and RNG
    COMPLETE          written last; lists every file with its size and content hash

Everything is first written into `.tmp-step-0000120/`, fsynced, marked, then renamed into place, so a
job killed at any moment leaves either a complete checkpoint or a temp folder that is ignored and
cleaned up later. Loading always uses `torch.load(weights_only=True)`: no pickle from the run folder.

Every file's content hash is taken from its bytes in memory as it is written, and every load first
verifies the marker, sizes and hashes (`verify`): a flipped byte in a tensor, a damaged zip header or a
cut file is named in one line, and the newest intact older checkpoint is used instead. The hash guards
against storage damage, not tampering, and costs next to nothing: torch.save's zip writer already computes
a CRC-32 of every record it stores (each tensor's bytes), so a torch file's hash is the SHA-1 of everything
but the records' data (headers, names, those CRCs), and verifying also checks each record's data against
its CRC. Text files (state, config) are hashed whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import mmap
import os
import re
import shutil
import struct
import zipfile
import zlib
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
HASH = "sha1"
HASH_SCHEME = "sha1, zip records by CRC-32"  # recorded in the marker, so a change of scheme is seen
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


def _records(data: bytes | memoryview | mmap.mmap) -> list[tuple[int, int, int]]:
    """(start, end, CRC-32) of each stored record's data in a zip file's bytes; [] for anything else.
    Raises zipfile.BadZipFile or struct.error on a damaged zip structure."""
    if bytes(data[:4]) != b"PK\x03\x04":
        return []
    records = []
    with _Reader(data) as reader, zipfile.ZipFile(reader) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                return []
            name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
            start = info.header_offset + 30 + name_len + extra_len
            records.append((start, start + info.compress_size, info.CRC))
    return sorted(records)


class _Reader(io.RawIOBase):
    """A read-only, seekable file over bytes in memory or a mapped file, without copying them."""

    def __init__(self, data: bytes | memoryview | mmap.mmap) -> None:
        self._data, self._pos = memoryview(data), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset + (0, self._pos, len(self._data))[whence]
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        chunk = self._data[self._pos:self._pos + len(buffer)]
        buffer[:len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)

    def close(self) -> None:
        self._data.release()
        super().close()


def _digest(data: bytes | memoryview | mmap.mmap, records: list[tuple[int, int, int]]) -> str:
    """SHA-1 of `data` leaving out the records' data (each covered by its CRC-32, which is hashed)."""
    view, digest, pos = memoryview(data), hashlib.new(HASH, usedforsecurity=False), 0
    for start, end, _ in records:
        digest.update(view[pos:start])
        pos = end
    digest.update(view[pos:])
    return digest.hexdigest()


def _content_problem(path: Path, recorded: str) -> str | None:
    """What is wrong with a file's content against its recorded hash, or None."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return None if _digest(b"", []) == recorded else "hash check failed: differs from the recorded hash"
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                records = _records(data)
            except (zipfile.BadZipFile, struct.error, ValueError, EOFError):
                return "hash check failed: zip structure unreadable"
            if _digest(data, records) != recorded:
                return "hash check failed: differs from the recorded hash"
            view = memoryview(data)
            try:
                for start, end, crc in records:
                    if zlib.crc32(view[start:end]) != crc:
                        return f"hash check failed: bytes {start}..{end} (a stored record) differ from their CRC-32"
            finally:
                view.release()
    return None


def _serialise(obj: Any) -> bytes | memoryview:
    """Strings (JSON, YAML) as UTF-8 text, anything else through torch.save, in memory: a full disk or
    quota then fails as an OSError of our own write, not as an error deep inside torch's zip writer."""
    if isinstance(obj, str):
        return obj.encode()
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def file_hash(data: bytes | memoryview) -> str:
    """The content hash `verify` checks a file against."""
    return _digest(data, _records(data))


def _write_bytes(data: bytes | memoryview, path: Path) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _write(obj: Any, path: Path, hashed: bool = True) -> str | None:
    """Write `obj` fsynced; returns its content hash, taken from the bytes in memory (None: `hashed` off)."""
    data = _serialise(obj)
    _write_bytes(data, path)
    return file_hash(data) if hashed else None


def _write_text(text: str, path: Path) -> None:
    path.write_text(text)
    _fsync_file(path)


def _read(path: Path) -> Any:
    if path.suffix in (".json", ".yaml"):
        try:
            return path.read_text()
        except OSError as err:
            raise CheckpointError(f"{path} is unreadable ({err}); "
                                  "move its folder away to resume from the previous one") from None
    return load_torch(path)


def is_complete(folder: Path) -> bool:
    """A folder counts only if its marker exists and every listed file has its recorded size (the cheap
    check, for pruning; `verify` also reads every file)."""
    try:
        listing = json.loads((folder / MARKER).read_text())
        return all((folder / name).stat().st_size == size for name, size in listing["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def verify(folder: Path) -> str | None:
    """None when `folder` is an intact checkpoint, else what failed: the file and the check (missing
    marker, unparsable marker, missing, size, hash). Markers from before hashes were recorded are checked
    by size only."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        sizes, digests = marker["files"], marker.get("digests", {})
        checks = [(str(name), int(size), digests.get(name)) for name, size in sizes.items()]
        if digests and marker.get("hash") != HASH_SCHEME:
            raise ValueError(f"hash scheme {marker.get('hash')!r}")
    except FileNotFoundError:
        return f"{MARKER}: missing marker"
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return f"{MARKER}: unparsable marker"
    for name, size, digest in checks:
        path = folder / name
        try:
            actual = path.stat().st_size
            if actual != size:
                return f"{name}: size {actual} bytes, recorded {size}"
            if digest is not None and (problem := _content_problem(path, digest)) is not None:
                return f"{name}: {problem}"
        except FileNotFoundError:
            return f"{name}: missing"
        except OSError as err:
            return f"{name}: unreadable ({err.strerror or err})"
    return None


def step_of(folder: Path) -> int | None:
    """The step a checkpoint folder holds, from its name (step-NNNNNNN) or, for best/, its marker."""
    match = _STEP_DIR.match(folder.name)
    if match:
        return int(match.group(1))
    try:
        return int(json.loads((folder / MARKER).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint folder is incomplete; "
                              "move the folder away to resume from the previous one") from None
    except Exception as err:  # noqa: BLE001 - corrupt or foreign files fail in many ways
        raise CheckpointError(f"{path} cannot be loaded safely ({type(err).__name__}: {err}); "
                              "it is damaged or not an hpcgan checkpoint: move its folder away") from None


# A checkpoint folder, or a checkpoint held in memory ({file name: serialised bytes}, from `snapshot`).
Source = Path | dict[str, Any]

# How a per-rank part continues from a checkpoint written by another number of processes: called with the part
# and the resume's context (hpcgan.train.distributed.NewWorld), it sets the part's state and says what it did.
Reshard = Callable[[Any, Any], str]


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


@dataclass
class _Part:
    name: str
    part: Stateful
    file: str  # a shared file (rank 0 writes it) or "" for the per-rank file
    optional: bool  # may be missing (its file or its entry); loading then leaves it as it is
    reshard: Reshard | None = None  # per-rank parts: how they continue on another number of processes


class CheckpointManager:
    """Saves, finds, loads, prunes and promotes the checkpoints of one run; every rank holds one.

    `agree(ok)` returns True on every rank only if `ok` is True on every rank (an all-reduce; the
    identity for one process), so a write that fails on one rank fails the save everywhere without a
    hang. `share(value)` returns rank 0's integer on every rank (a broadcast): rank 0 verifies and
    chooses the checkpoint to load, every rank loads that one. Global rank 0 writes the shared files and
    commits; each rank writes its own file into the shared temp folder.
    """

    def __init__(self, root: Path, *, keep: int, milestones: list[int] = (), rank: int = 0,
                 agree: Callable[[bool], bool] = lambda ok: ok, best: Path | None = None,
                 share: Callable[[int], int] = lambda value: value) -> None:
        self.root = Path(root)
        self.keep, self.milestones = keep, set(milestones)
        self.rank, self.agree, self.best, self.share = rank, agree, best, share
        self.expected_bytes = 0  # the owner's estimate of one checkpoint, for errors before the first exists
        self._parts: list[_Part] = []
        self.hashing = True  # off only to measure what hashing costs a save

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def register(self, name: str, part: Stateful, *, file: str, optional: bool = False) -> None:
        """Save `part.state_dict()` under `name` in the shared `file` (`.json`/`.yaml` files hold one part,
        whose state is text); parts load in the order they were registered."""
        self._parts.append(_Part(name, part, file, optional))

    def register_rank(self, name: str, part: Stateful, *, reshard: Reshard) -> None:
        """Save `part.state_dict()` under `name` in each rank's own file. `reshard` is its rule for a
        checkpoint another number of processes wrote (the rules are in hpcgan.train.distributed): a
        per-rank part without one would silently restart from scratch on a change of world size."""
        if not callable(reshard):
            raise TypeError(f"per-rank checkpoint part '{name}' needs a reshard rule "
                            f"(see hpcgan.train.distributed), got {reshard!r}")
        self._parts.append(_Part(name, part, "", False, reshard))

    def rank_parts(self) -> list[tuple[str, Stateful, Reshard]]:
        """The per-rank parts with their reshard rules, in registration order."""
        return [(p.name, p.part, p.reshard) for p in self._parts if not p.file]

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

    def step_folders(self) -> list[Path]:
        """Every step folder, committed or not, oldest first (temp folders excluded)."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), c) for c in self.root.iterdir() if (m := _STEP_DIR.match(c.name)) and c.is_dir()]
        return [folder for _, folder in sorted(found)]

    def newest_intact(self, at_most: int | None = None) -> Path | None:
        """The newest checkpoint (with step <= `at_most`) that passes `verify`; each damaged one that is
        newer is reported in one warning line. With `at_most`, best/ is the last resort (older steps may
        be pruned). Not a collective: see `latest`."""
        candidates = [f for f in reversed(self.step_folders()) if at_most is None or step_of(f) <= at_most]
        best_step = step_of(self.best) if at_most is not None and self.best is not None else None
        if best_step is not None and best_step <= at_most:
            candidates.append(self.best)
        for folder in candidates:
            problem = verify(folder)
            if problem is None:
                return folder
            log.warning("checkpoint %s is damaged (%s): falling back to an older one", folder, problem)
        return None

    def latest(self, at_most: int | None = None) -> Path | None:
        """The newest intact checkpoint (step <= `at_most`), chosen by rank 0 and the same on every rank:
        a collective when there are several."""
        folder = self.newest_intact(at_most) if self.is_main else None
        code = -1 if folder is None else -2 if folder == self.best else step_of(folder)
        code = self.share(code)
        return None if code == -1 else self.best if code == -2 else self.root / step_dir_name(code)

    def discard_after(self, step: int) -> None:
        """Remove the checkpoints newer than `step` (rank 0): an abandoned stretch a resume must not pick."""
        if self.is_main:
            for folder in self.step_folders():
                if step_of(folder) > step:
                    shutil.rmtree(folder, ignore_errors=True)

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
                if final.exists() and verify(final) is not None:
                    shutil.rmtree(final)
                tmp.mkdir()
            except OSError as err:
                error = err
        already = final.exists()  # a step saved twice (e.g. periodic + final) keeps the first copy
        digests: dict[str, str | None] = {}
        if self.agree(error is None) and not already:
            try:
                digests = {name: _write(obj, tmp / name, self.hashing) for name, obj in files.items()}
            except OSError as err:
                error = err
        if self.agree(error is None) and self.is_main:
            try:
                if already:
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    self._commit(step, tmp, final, digests)
            except OSError as err:
                error = err
        if not self.agree(error is None):
            self._fail(step, tmp, error)
        if self.is_main and not already:
            self._prune()
        return final

    def _commit(self, step: int, tmp: Path, final: Path, digests: dict[str, str | None]) -> None:
        """Mark `tmp` complete and rename it into place. Files written by other ranks (small: RNG and
        reader states) are hashed here from disk."""
        listing = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        marker: dict[str, Any] = {"step": step, "files": listing}
        if self.hashing:
            for name in listing:
                if digests.get(name) is None:
                    digests[name] = file_hash((tmp / name).read_bytes())
            marker.update(hash=HASH_SCHEME, digests={name: digests[name] for name in listing})
        _write_text(json.dumps(marker, indent=1), tmp / MARKER)
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(self.root)

    def _fail(self, step: int, tmp: Path, error: OSError | None) -> None:
        needed = max(sum(p.stat().st_size for p in tmp.iterdir()) if tmp.is_dir() else 0, self.expected_bytes)
        steps = self.complete_steps()
        latest = self.root / step_dir_name(steps[-1]) if steps else None
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
    def snapshot(self) -> dict[str, bytes]:
        """This rank's parts serialised in memory, as `save` would write them: a rollback target for a
        run that has no checkpoint yet."""
        return {name: bytes(_serialise(obj)) for name, obj in self._gather({}).items()}

    def load(self, source: Source) -> bool:
        """Load every registered part from a checkpoint folder (or a `snapshot`), in registration order.
        Returns False when it holds no file for this rank (written by fewer processes): per-rank parts
        stay as they are. Verifying the folder is the caller's part (`latest`, `resolve_checkpoint`)."""
        folder = source if isinstance(source, Path) else Path("<in-memory snapshot>")

        def exists(file: str) -> bool:
            return (folder / file).exists() if isinstance(source, Path) else file in source

        def read(file: str) -> Any:
            if isinstance(source, Path):
                return _read(folder / file)
            data = source[file]
            if file.endswith((".json", ".yaml")):
                return data.decode()
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

        loaded: dict[str, Any] = {}
        has_rank_file = exists(rank_file_name(self.rank))
        for p in self._parts:
            file = p.file or rank_file_name(self.rank)
            if (not p.file and not has_rank_file) or (p.optional and not exists(file)):
                continue
            if file not in loaded:
                loaded[file] = read(file)
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
    """A verified checkpoint folder as given (a step folder or best/), or the newest intact one of a run
    folder; a damaged folder given directly is refused in one line."""
    path = Path(path)
    if (path / MARKER).exists():
        problem = verify(path)
        if problem is not None:
            raise CheckpointError(f"{path} is a damaged checkpoint ({problem}); point at another one, or "
                                  "at the run folder to use its newest intact checkpoint")
        return path
    manager = CheckpointManager(RunFolder(path).checkpoints, keep=1)
    latest = manager.latest()
    if latest is None:
        damaged = " (all damaged)" if manager.step_folders() else ""
        raise CheckpointError(f"{path}: no intact checkpoint found{damaged} (expected RUN/checkpoints/step-*/"
                              f"{MARKER}); train first or point at a checkpoint folder")
    return latest
