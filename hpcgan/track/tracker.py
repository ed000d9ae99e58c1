"""MLflow tracking from global rank 0, off the training thread.

A synchronous MLflow call costs ~10 ms, so the loop only appends to a queue; a background thread
batches metrics into `log_batch` calls. If the store is unreachable the thread warns once, keeps the
records and retries (creating the run too, if the server was down at start): training never waits for,
or dies of, a log call. One run folder is one MLflow run: its id is handed to `on_run` (the run folder's
tracking file) the moment the server knows it, and a resumed run continues it, logging only params the
run does not have yet (MLflow params are immutable); values that changed on resume are recorded as tags.
The tag `hpcgan.status` says what the MLflow status cannot: running, requeue-pending (exit 75, the
scheduler may start it again), finished, failed (with `hpcgan.failure`), killed.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import subprocess
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

# Clusters that hold patient data must not phone home; set before mlflow is imported.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# Fail fast on an unreachable server: the thread retries on its own schedule.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
# urllib3 warns on every retry of every call; the tracker says once that the server is down instead.
logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from hpcgan.config import resolve_tracking_uri  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

log = logging.getLogger(__name__)

_MAX_PENDING = 200_000  # metric records kept while the store is down (a few MB)
_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch


JOB_IDS_TAG = "slurm.job_ids"  # every SLURM job that trained this run, comma-separated, in order
STATUS_TAG, FAILURE_TAG = "hpcgan.status", "hpcgan.failure"


def git_commit() -> str | None:
    """The commit of the checkout this package lives in; None when it is installed elsewhere (a wheel in
    site-packages, even inside somebody's repository, has no commit of its own)."""
    package_root = Path(__file__).resolve().parents[2]
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=package_root,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = top.stdout.split()
    if top.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != package_root:
        return None
    return lines[1]


def run_tags() -> dict[str, str]:
    """Where the run came from: code version, host, SLURM job and nodes (absent ones are skipped)."""
    from hpcgan import __version__

    tags = {"host": socket.gethostname(), "hpcgan.version": __version__}
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME",
                "SLURM_JOB_PARTITION", "SLURM_JOB_NUM_NODES", "SLURM_JOB_NODELIST", "SLURM_RESTART_COUNT"):
        if os.environ.get(var):
            tags[f"slurm.{var[6:].lower()}"] = os.environ[var]
    return tags


def _append_job(previous: str | None, job: str | None) -> str | None:
    """The job-id list with `job` appended once (a requeued job keeps its id; a resubmitted one adds one)."""
    jobs = [j for j in (previous or "").split(",") if j]
    if job and job not in jobs:
        jobs.append(job)
    return ",".join(jobs) or None


def start_system_metrics(run_id: str, uri: str, every_s: float, node_id: str | None = None) -> Any:
    """MLflow's sampler of this node's CPU, memory, disk, network, and each GPU where pynvml is importable,
    into `run_id` as `system/*` (`system/<node_id>/*` when given), continuing a resumed run's step count."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, resume_logging=True, node_id=node_id,
                                   tracking_uri=resolve_tracking_uri(uri))
    monitor.start()
    return monitor


class Tracker:
    """One MLflow run; all public methods return at once."""

    def __init__(self, *, uri: str, experiment: str, run_name: str, params: dict[str, Any],
                 tags: dict[str, str], run_id: str | None = None, flush_every_s: float = 2.0,
                 system_metrics_every_s: float = 0.0, system_node_id: str | None = None,
                 on_run: Callable[[str], None] | None = None) -> None:
        self.uri = resolve_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment, self.run_name = experiment, run_name
        self.run_id = run_id
        self._params = {k: str(v) for k, v in params.items()}
        self._tags = tags
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._pending: list[Metric] = []
        self._artifacts: list[tuple[str, str | None]] = []
        self._on_run = on_run
        self._down = False  # the store failed its last call; warned once
        self._late = 0  # metrics delivered during the current outage's recovery
        self._started = False
        self._flush_every_s = flush_every_s
        self._system_every_s = system_metrics_every_s
        self._system: Any = None
        self._system_node_id = system_node_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._worker, name="mlflow-tracker", daemon=True)
        self._try(self._start_run)  # best effort now, so the id is known for the first checkpoint
        self._thread.start()

    # ---- called from the training loop -------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._queue.put(("metrics", (metrics, step, int(time.time() * 1000))))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._queue.put(("artifact", (str(path), artifact_path)))

    def set_tag(self, key: str, value: str) -> None:
        """A run tag, set at once: for rare events (a rollback), not for every step."""
        if self._started:
            self._try(lambda: self.client.set_tag(self.run_id, key, value))

    def close(self, status: str = "FINISHED", timeout_s: float = 60.0, *, requeue: bool = False,
              failure: str | None = None) -> bool:
        """Flush and end the run with `status` (FINISHED, FAILED with `failure`, the reason, or KILLED;
        `requeue`: killed, resumable); False (with a warning) when records could not be delivered."""
        tags = {STATUS_TAG: "requeue-pending" if requeue else status.lower()}
        if failure:
            tags[FAILURE_TAG] = failure
        if self._system is not None:
            self._system.finish()
        self._stop.set()
        self._thread.join(timeout_s)
        self._drain()
        self._try(self._flush)
        delivered = self._started and not self._pending and not self._artifacts
        if self._started:
            def end() -> None:
                self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
                self.client.set_terminated(self.run_id, status=status)
            self._try(end)
        if not delivered:
            log.warning("MLflow at %s: %d metric(s) and %d artifact(s) not delivered; the run folder keeps "
                        "metrics.jsonl and samples/", self.uri, len(self._pending), len(self._artifacts))
        return delivered

    # ---- background thread -------------------------------------------------------------------
    def _worker(self) -> None:
        while not self._stop.wait(self._flush_every_s):
            self._drain()
            self._try(self._flush)

    def _drain(self) -> None:
        while True:
            try:
                kind, payload = self._queue.get_nowait()
            except queue.Empty:
                return
            if kind == "metrics":
                metrics, step, stamp = payload
                self._pending.extend(Metric(k, float(v), stamp, step) for k, v in metrics.items())
                del self._pending[:-_MAX_PENDING]
            elif kind == "artifact":
                self._artifacts.append(payload)

    def _try(self, action: Callable[[], None]) -> None:
        """Run `action`; one warning when the store goes down, one when it answers again."""
        try:
            action()
        except Exception as err:  # noqa: BLE001 - a tracking outage must never stop training
            if not self._down:
                log.warning("MLflow at %s unreachable (%s: %s); training goes on, logging will retry",
                            self.uri, type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
                self._down = True
            return
        if self._down:
            log.warning("MLflow at %s is reachable again: %d metric(s) delivered late", self.uri, self._late)
            self._down, self._late = False, 0

    def _start_run(self) -> None:
        if self._started:
            return
        if self.run_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
            run = self.client.create_run(exp_id, run_name=self.run_name or None)
            self.run_id = run.info.run_id
            if self._on_run is not None:  # recorded before anything else can fail: a retry must not make a second run
                self._on_run(self.run_id)
        else:
            run = self.client.get_run(self.run_id)
            self.client.update_run(self.run_id, status="RUNNING")
        existing = run.data.params
        new = [Param(k, v) for k, v in self._params.items() if k not in existing]
        changed = {f"resume.changed.{k}": v for k, v in self._params.items() if k in existing and existing[k] != v}
        lifecycle = {STATUS_TAG: "running"}
        if jobs := _append_job(run.data.tags.get(JOB_IDS_TAG), self._tags.get("slurm.job_id")):
            lifecycle[JOB_IDS_TAG] = jobs
        tags = [RunTag(k, str(v)) for k, v in {**self._tags, **changed, **lifecycle}.items()]
        for i in range(0, max(len(new), 1), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=new[i:i + 100], tags=tags if i == 0 else [])
        self._started = True
        self._start_system_metrics()

    def _start_system_metrics(self) -> None:
        """MLflow's own sampler of CPU, memory, disk, network (and GPU where visible) as `system/*`,
        continuing the step count of a resumed run."""
        if self._system_every_s <= 0 or self._system is not None:
            return
        self._system = start_system_metrics(self.run_id, self.uri, self._system_every_s, self._system_node_id)

    def _flush(self) -> None:
        self._start_run()
        while self._pending:
            batch = self._pending[:_BATCH]
            self.client.log_batch(self.run_id, metrics=batch)
            del self._pending[:_BATCH]
            if self._down:
                self._late += len(batch)
        while self._artifacts:
            path, artifact_path = self._artifacts[0]
            self.client.log_artifact(self.run_id, path, artifact_path)
            self._artifacts.pop(0)

    def log_generator(self, generator, nz: int) -> None:
        """The final EMA generator as an MLflow model (pt2 export, not pickle), synchronously; a
        conditional one takes int64 class labels beside z. Exported from a CPU copy: the input example
        is a CPU array, and the training device may be gone where the model is loaded. A failure costs
        one warning line: the checkpoint holds the same weights."""
        import copy

        import numpy as np
        import mlflow.pytorch
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        z = np.zeros((2, nz), dtype=np.float32)
        inputs: tuple[Any, ...] = (z,)
        extra: dict[str, Any] = {"input_example": z}
        if getattr(generator, "num_classes", 0):  # two inputs: MLflow cannot infer the signature of a tuple
            inputs = (z, np.zeros(2, dtype=np.int64))
            extra = {"input_example": inputs,
                     "signature": ModelSignature(inputs=Schema([TensorSpec(z.dtype, (-1, nz), "z"),
                                                                TensorSpec(np.dtype(np.int64), (-1,), "labels")]))}
        try:
            self._start_run()
            module = copy.deepcopy(getattr(generator, "_orig_mod", generator)).float().cpu().eval()
            with torch.no_grad():  # run once here: a broken forward is named as such, not as a signature error
                module(*(torch.from_numpy(a) for a in inputs))
            mlflow.set_tracking_uri(self.uri)
            with mlflow.start_run(run_id=self.run_id):
                mlflow.pytorch.log_model(module, name="generator", serialization_format="pt2", **extra)
        except Exception as err:  # noqa: BLE001 - the model is a copy of the checkpoint's EMA weights
            cause = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            log.warning("generator not logged as an MLflow model (%s: %s); the run folder's checkpoint holds "
                        "its weights", type(err).__name__, cause)
