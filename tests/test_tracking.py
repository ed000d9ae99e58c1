"""MLflow tracking against a real local store and a real server on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from hpcgan.train import EXIT_INTERRUPTED

from helpers import make_trainer


def tracked_trainer(data, out, uri, *extra):
    return make_trainer(data, out, "track.enabled=true", f"track.uri={uri}", "track.experiment=t",
                        "track.flush_every_s=0.2", "train.sample_every=4", *extra)


def signal_after_lines(path, lines: int) -> threading.Thread:
    """Send this process SIGUSR1 once `path` has `lines` lines: a real signal, mid-run."""
    def watch():
        while not (path.exists() and len(path.read_text().splitlines()) >= lines):
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGUSR1)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_interrupted_and_resumed_run_is_one_mlflow_run(image_folder, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    watcher = signal_after_lines(out / "metrics.jsonl", 5)
    first = tracked_trainer(image_folder, out, uri, "train.steps=16")
    assert first.fit() == EXIT_INTERRUPTED
    watcher.join()
    stopped = first.state.step
    second = tracked_trainer(image_folder, out, uri, "train.steps=16", "train.lr=1e-4")  # a changed param
    assert second.fit() == 0
    assert second.state.mlflow_run_id == first.state.mlflow_run_id

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.0002"  # params are immutable: the first value stays
    assert run.data.tags["resume.changed.train.lr"] == "0.0001"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss_d")})
    assert steps == list(range(1, 17)), (stopped, steps)
    assert client.get_metric_history(run.info.run_id, "restarts")[-1].value == 1
    assert {"d_real", "d_fake", "images_per_s", "loss_g"} <= run.data.metrics.keys()
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert "samples/step-0000016.png" in samples and "samples/step-0000004.png" in samples


def test_unreachable_tracking_server_does_not_stop_training(image_folder, tmp_path, caplog):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    caplog.set_level("WARNING")
    trainer = tracked_trainer(image_folder, tmp_path / "run", f"http://127.0.0.1:{port}", "train.steps=6")
    assert trainer.fit() == 0
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1  # warned once, not per step
    assert "not delivered" in caplog.text
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 6  # nothing lost locally


@pytest.mark.slow
def test_real_server_on_loopback_gets_metrics_samples_and_model(image_folder, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        uri = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        trainer = tracked_trainer(image_folder, tmp_path / "run", uri, "train.steps=4", "track.log_model=true")
        assert trainer.fit() == 0
        client = MlflowClient(uri)
        run = client.get_run(trainer.state.mlflow_run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["loss_d"] > 0
        assert run.data.tags["host"] == socket.gethostname()
        logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
        assert [m.name for m in logged] == ["generator"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_run_ends_with_quality_curves_floors_system_metrics_and_a_report(image_folder, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trainer = tracked_trainer(image_folder, tmp_path / "run", uri, "train.steps=60", "track.system_metrics_every_s=0.3",
                              "metrics.every=30", "metrics.n=24", "track.report=true")
    assert trainer.fit() == 0
    client = MlflowClient(uri)
    run = client.get_run(trainer.state.mlflow_run_id)
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/swd")] == [30, 60]
    assert {"floor/swd", "floor_halves/swd", "floor/msssim", "images_seen", "eval_s"} <= run.data.metrics.keys()
    assert [a.path for a in client.list_artifacts(run.info.run_id, "report")] == ["report/report.html"]


class BrokenGenerator(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, z):
        raise RuntimeError("forward is broken")


def test_model_logging_failure_is_one_warning_and_the_run_still_finishes(tmp_path, caplog):
    from hpcgan.track import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri=uri, experiment="t", run_name="r", params={"a": 1}, tags={})
    caplog.set_level("WARNING")
    tracker.log_generator(BrokenGenerator(), nz=4)
    assert tracker.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "generator not logged as an MLflow model (RuntimeError: forward is broken)" in warnings[0]
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == "FINISHED"
