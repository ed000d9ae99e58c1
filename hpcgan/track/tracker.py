"""MLflow tracking from global rank 0, off the training thread.

A synchronous MLflow call costs ~10 ms, so the loop only appends to a queue; a background thread
batches metrics into `log_batch` calls. If the store is unreachable the thread warns once, keeps the
records and retries: training never waits for, or dies of, a log call. A resumed run continues the
MLflow run whose id the checkpoint holds, and logs only params the run does not have yet (MLflow
params are immutable); values that changed on resume are recorded as tags instead.
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
from typing import Any

# Clusters that hold patient data must not phone home; set before mlflow is imported.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# Fail fast on an unreachable server: the thread retries on its own schedule.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from hpcgan.config import resolve_tracking_uri  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

log = logging.getLogger(__name__)

_MAX_PENDING = 200_000  # metric records kept while the store is down (a few MB)
_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch


def run_tags() -> dict[str, str]:
    """Where the run came from: code version, host, SLURM job ids (absent ones are skipped)."""
    tags = {"host": socket.gethostname()}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME",
                "SLURM_JOB_PARTITION", "SLURM_JOB_NUM_NODES", "SLURM_RESTART_COUNT"):
        if os.environ.get(var):
            tags[f"slurm.{var[6:].lower()}"] = os.environ[var]
    return tags


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
                 system_metrics_every_s: float = 0.0, system_node_id: str | None = None) -> None:
        self.uri = resolve_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment, self.run_name = experiment, run_name
        self.run_id = run_id
        self._params = {k: str(v) for k, v in params.items()}
        self._tags = tags
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._pending: list[Metric] = []
        self._artifacts: list[tuple[str, str | None]] = []
        self._warned = False
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

    def close(self, status: str = "FINISHED", timeout_s: float = 60.0) -> bool:
        """Flush and end the run; False (with a warning) when records could not be delivered."""
        if self._system is not None:
            self._system.finish()
        self._stop.set()
        self._thread.join(timeout_s)
        self._drain()
        self._try(self._flush)
        delivered = self._started and not self._pending and not self._artifacts
        if delivered:
            self._try(lambda: self.client.set_terminated(self.run_id, status=status))
        else:
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

    def _try(self, action) -> None:
        try:
            action()
            if self._warned:
                log.warning("MLflow at %s is reachable again; logging resumed", self.uri)
                self._warned = False
        except Exception as err:  # noqa: BLE001 - a tracking outage must never stop training
            if not self._warned:
                log.warning("MLflow at %s unreachable (%s: %s); training goes on, logging will retry",
                            self.uri, type(err).__name__, str(err).splitlines()[0][:200])
                self._warned = True

    def _start_run(self) -> None:
        if self._started:
            return
        if self.run_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
            run = self.client.create_run(exp_id, run_name=self.run_name or None)
            self.run_id = run.info.run_id
            existing: dict[str, str] = {}
        else:
            existing = self.client.get_run(self.run_id).data.params
            self.client.update_run(self.run_id, status="RUNNING")
        new = [Param(k, v) for k, v in self._params.items() if k not in existing]
        changed = {f"resume.changed.{k}": v for k, v in self._params.items() if k in existing and existing[k] != v}
        tags = [RunTag(k, str(v)) for k, v in {**self._tags, **changed}.items()]
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
            self.client.log_batch(self.run_id, metrics=self._pending[:_BATCH])
            del self._pending[:_BATCH]
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
