"""The run folder, the unit of truth for one run: the only code that knows the names of the files in it.

Layout of `RUN/`:
    config.yaml      the resolved config of the latest start (a resume starts from it)
    checkpoints/     step folders written by `CheckpointManager`
    best/            a copy of the checkpoint with the best in-loop metric
    samples/         fixed-noise sample grids, `step-0000500.png`
    metrics.jsonl    one JSON record per log interval and evaluation
    tracking.json    the MLflow run id and store, so a requeued job continues the same MLflow run
    cache/           per-run caches (real-set feature statistics)
    evaluation/      artefacts of `hpcgan evaluate` (closest pairs of the memorization audit, ...)
    metrics.json     the latest `hpcgan evaluate` report
    utility.json     the latest `hpcgan evaluate --utility` report (downstream classifier per arm)
    utility.png      its bar chart
    report/          `hpcgan report`: one self-contained HTML page and its plots
    .lock            the one writer's identity (see `RunLock`)
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcgan.config import Config, build_config, config_text, read_yaml

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"  # in a run folder and in each checkpoint folder
STALE_AFTER_S = 600.0  # a lock of another host untouched this long belongs to a dead job


class RunLockedError(RuntimeError):
    """Another live process writes to this run folder; the message names it."""


def atomic_write_text(path: Path, text: str) -> None:
    """All of `text` or the file as it was: a full disk leaves neither a truncated file nor a temp file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as err:  # named after the file the user knows, not the temp file (or none: a failed flush)
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def os_error_line(err: OSError) -> str:
    """A failed file operation as one line: the path, what the system said, and what to do about it."""
    where = err.filename or "a file"
    if err.errno in _FULL:
        fix = "free space, raise the quota or the file-size limit, then run the same command again"
    elif err.errno in _DENIED:
        fix = "make it writable or choose another path"
    else:
        fix = "check the path"
    return f"{where}: {err.strerror or err}; {fix}"


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def metrics_log(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tracking(self) -> Path:
        return self.root / "tracking.json"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def evaluation_report(self) -> Path:
        return self.root / "metrics.json"

    @property
    def utility_report(self) -> Path:
        return self.root / "utility.json"

    @property
    def utility_plot(self) -> Path:
        return self.root / "utility.png"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def sample_grid(self, step: int) -> Path:
        return self.samples / f"step-{step:07d}.png"

    def sample_grids(self) -> list[Path]:
        return sorted(self.samples.glob("step-*.png"))

    def sample_grid_steps(self) -> list[tuple[int, Path]]:
        """(step, path) of every sample grid, oldest first."""
        return [(int(p.stem.removeprefix("step-")), p) for p in self.sample_grids()]

    def is_run(self) -> bool:
        return self.checkpoints.is_dir()

    # ------------------------------------------------------------------ config
    def saved_config(self) -> dict[str, Any] | None:
        """The config saved by the latest start, as the nested dict `build_config(base=...)` takes."""
        return read_yaml(self.config) if self.config.exists() else None

    def write_config(self, cfg: Config) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config, config_text(cfg))

    # ------------------------------------------------------------------ logs
    def append_metrics(self, record: dict[str, Any]) -> None:
        """One whole line or none: a write cut short by a full disk is undone, so the log stays readable."""
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.metrics_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.metrics_log))
            except OSError as err:
                os.ftruncate(fd, end)
                raise OSError(err.errno, err.strerror, str(self.metrics_log)) from None
        finally:
            os.close(fd)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_log.exists():
            return []
        return [json.loads(line) for line in self.metrics_log.read_text().splitlines() if line.strip()]

    def read_tracking(self) -> dict[str, str] | None:
        """`{"run_id", "tracking_uri", "experiment"}` once MLflow has a run for this folder."""
        return json.loads(self.tracking.read_text()) if self.tracking.exists() else None

    def write_tracking(self, run_id: str, uri: str, experiment: str) -> None:
        atomic_write_text(self.tracking, json.dumps({"run_id": run_id, "tracking_uri": uri,
                                                     "experiment": experiment}))

    def lock(self, stale_after_s: float = STALE_AFTER_S) -> RunLock:
        return RunLock(self.lock_file, stale_after_s)


def config_of(folder: str | Path) -> Config:
    """The config a run or checkpoint folder was trained with: the one way a saved config is read."""
    return build_config(base=read_yaml(Path(folder) / CONFIG_FILE))


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (tells a live process from a reused pid), None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "since": time.time()}


class RunLock:
    """One writer per run folder, safe on NFS and Lustre, where `flock` may be a no-op.

    The lock is a file created by `link(2)` from a unique temp file (atomic on NFS, unlike O_EXCL on old
    clients) and holds the writer's host, pid, process start time and SLURM job id. The holder touches it
    while it trains (`heartbeat`). A lock is stale, and taken over, when its SLURM job id is this job's
    (a requeued job replacing its dead self), when its host is this host and the process is gone, or when
    another host's lock has not been touched for `stale_after_s`. Taking over renames the stale file
    away first, so of two jobs racing for a stale lock only one wins.
    """

    def __init__(self, path: Path, stale_after_s: float = STALE_AFTER_S) -> None:
        self.path, self.stale_after_s = path, stale_after_s
        self.held = False
        self._touched = 0.0

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._try_create():
                self.held, self._touched = True, time.monotonic()
                return
            holder = self._holder()
            why = self._stale_reason(holder)
            if why is None:
                raise RunLockedError(f"{self.path.parent} is in use by {self._describe(holder)}: wait for it to "
                                     f"finish, stop it, or train into another --out folder")
            graveyard = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(self.path, graveyard)
            except FileNotFoundError:
                continue  # another process took it over first; look again
            log.warning("took over the lock of %s (%s)", self._describe(holder), why)
            graveyard.unlink(missing_ok=True)
        raise RunLockedError(f"{self.path}: could not take the lock (contended); try again")

    def heartbeat(self, every_s: float = 30.0) -> None:
        """Touch the lock file; cheap to call every step, it writes at most once per `every_s`."""
        now = time.monotonic()
        if self.held and now - self._touched >= every_s:
            self._touched = now
            try:
                os.utime(self.path)
            except OSError as err:
                log.warning("cannot touch the run lock %s (%s)", self.path, err)

    def release(self) -> None:
        if self.held:
            self.held = False
            if (self._holder() or {}).get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)

    def _try_create(self) -> bool:
        tmp = self.path.with_name(f"{self.path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            tmp.write_text(json.dumps(_identity()))
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise OSError(err.errno, f"cannot create the run lock ({err.strerror})", str(self.path)) from None
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:
            # NFS may report a failed link that succeeded: the temp file's link count tells.
            return tmp.stat().st_nlink == 2
        finally:
            tmp.unlink(missing_ok=True)

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _stale_reason(self, holder: dict[str, Any] | None) -> str | None:
        if holder is None:
            return "unreadable lock file"
        me = _identity()
        if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me["slurm_job_id"]:
            return f"the same SLURM job {holder['slurm_job_id']}, requeued"
        if holder.get("host") == me["host"]:
            alive = _process_start(int(holder.get("pid", -1)))
            if alive is None or alive != holder.get("start"):
                return f"process {holder.get('pid')} is gone"
            return None
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "released meanwhile"
        return f"untouched for {age:.0f} s" if age > self.stale_after_s else None

    @staticmethod
    def _describe(holder: dict[str, Any] | None) -> str:
        if not holder:
            return "an unknown process"
        job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
        return f"pid {holder.get('pid')} on {holder.get('host')}{job}"
