"""MLflow tracking against a real local store and a real server on loopback."""

from __future__ import annotations

import json
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

import hpcgan
from hpcgan.train import EXIT_INTERRUPTED
from hpcgan.train.run_folder import RunFolder

from helpers import REPO, cli_env, free_port, hpcgan_cmd, make_trainer, run_cli, train_args


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


class MlflowServer:
    """A real `mlflow server` on loopback that can be stopped and started again on the same port and store."""

    def __init__(self, root, port: int) -> None:
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> MlflowServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            cwd=self.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, start_new_session=True)
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                assert self.proc.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its gunicorn/uvicorn workers
            self.proc.wait(timeout=60)
        self.proc = None


def _train_in_background(data, out, uri, stderr, *extra, **env):
    args = train_args(data, out, "train.steps=100000", "track.enabled=true", f"track.uri={uri}", "track.experiment=t",
                      "track.flush_every_s=0.2", "track.system_metrics_every_s=0", "track.log_model=false", *extra)
    return subprocess.Popen(hpcgan_cmd(*args), env=cli_env(**env), stdout=subprocess.DEVNULL, stderr=stderr)


def _wait(condition, proc, stderr, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None and time.time() < deadline, stderr.read_text()[-3000:]
        time.sleep(0.05)


def _logged_steps(out) -> list[int]:
    return [r["step"] for r in RunFolder(out).read_metrics() if "loss_d" in r]


def _lines(stderr, text: str) -> list[str]:
    return [line for line in stderr.read_text().splitlines() if text in line]


@pytest.mark.slow
def test_server_that_comes_up_mid_run_gets_the_one_run_that_a_resume_continues(image_folder, tmp_path):
    server, out, stderr = MlflowServer(tmp_path, free_port()), tmp_path / "run", tmp_path / "stderr.txt"
    job = {"SLURM_JOB_ID": "101", "SLURM_JOB_NODELIST": "node[1-2]"}
    with open(stderr, "w") as log:
        proc = _train_in_background(image_folder, out, server.uri, log, **job)
    try:
        _wait(lambda: _lines(stderr, "step 3/"), proc, stderr)
        assert not (out / "tracking.json").exists() and len(_lines(stderr, "unreachable")) == 1
        server.start()
        _wait(lambda: _lines(stderr, "reachable again"), proc, stderr)
        run_id = json.loads((out / "tracking.json").read_text())["run_id"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == EXIT_INTERRUPTED
        client = MlflowClient(server.uri)
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and run.data.tags["hpcgan.status"] == "requeue-pending"
        late = int(_lines(stderr, "reachable again")[0].split(": ")[-1].split()[0])
        assert late >= 3 * 6  # the steps trained while it was down, delivered: 6+ metrics per step
        logged = _logged_steps(out)
        history = [m.step for m in client.get_metric_history(run_id, "loss_d")]
        assert history == logged == list(range(1, len(logged) + 1))
        stopped = logged[-1]

        resumed = run_cli(*train_args(image_folder, out, f"train.steps={stopped + 2}", "track.enabled=true",
                                      f"track.uri={server.uri}", "track.experiment=t", "track.log_model=false",
                                      "track.system_metrics_every_s=0"), SLURM_JOB_ID="102")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
        assert [r.info.run_id for r in runs] == [run_id]
        run = runs[0]
        assert run.info.status == "FINISHED" and run.data.tags["hpcgan.status"] == "finished"
        assert run.data.tags["slurm.job_ids"] == "101,102" and run.data.tags["slurm.job_nodelist"] == "node[1-2]"
        assert run.data.tags["hpcgan.version"] == hpcgan.__version__
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        assert run.data.tags["mlflow.source.git.commit"] == head
        assert "Retrying" not in stderr.read_text() + resumed.stderr  # urllib3's per-call retry warnings
    finally:
        proc.kill()
        server.stop()


@pytest.mark.slow
def test_server_outage_is_two_lines_and_a_failure_is_recorded_with_its_reason(image_folder, tmp_path):
    server, out, stderr = MlflowServer(tmp_path, free_port()).start(), tmp_path / "run", tmp_path / "stderr.txt"
    with open(stderr, "w") as log:
        proc = _train_in_background(image_folder, out, server.uri, log)
    try:
        _wait(lambda: (out / "tracking.json").exists() and _lines(stderr, "step 3/"), proc, stderr)
        run_id = json.loads((out / "tracking.json").read_text())["run_id"]
        server.stop()
        _wait(lambda: _lines(stderr, "unreachable"), proc, stderr)
        down_at = len(RunFolder(out).read_metrics())
        _wait(lambda: len(RunFolder(out).read_metrics()) >= down_at + 5, proc, stderr)
        server.start()
        _wait(lambda: _lines(stderr, "reachable again"), proc, stderr)
        _wait(lambda: len(RunFolder(out).read_metrics()) >= down_at + 10, proc, stderr)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == EXIT_INTERRUPTED
        assert len(_lines(stderr, "unreachable")) == 1 and len(back := _lines(stderr, "reachable again")) == 1
        assert int(back[0].split(": ")[-1].split()[0]) >= 5 * 6
        assert "Retrying" not in stderr.read_text()
        client = MlflowClient(server.uri)
        logged = _logged_steps(out)
        history = [m.step for m in client.get_metric_history(run_id, "loss_d")]
        assert history == logged == list(range(1, len(logged) + 1))
    finally:
        proc.kill()
    # A run that fails: its checkpoint folder cannot be made (a file is in the way).
    failing = tmp_path / "failing"
    failing.mkdir()
    (failing / "checkpoints").write_text("in the way")
    failed = run_cli(*train_args(image_folder, failing, "train.steps=2", "checkpoint.every=2", "track.enabled=true",
                                 f"track.uri={server.uri}", "track.experiment=t", "track.log_model=false",
                                 "track.system_metrics_every_s=0"))
    try:
        assert failed.returncode == 2 and "cannot write checkpoint step 2" in failed.stderr
        run = MlflowClient(server.uri).get_run(json.loads((failing / "tracking.json").read_text())["run_id"])
        assert run.info.status == "FAILED" and run.data.tags["hpcgan.status"] == "failed"
        assert run.data.tags["hpcgan.failure"].startswith("CheckpointError: cannot write checkpoint step 2")
    finally:
        server.stop()


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
