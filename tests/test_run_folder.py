"""The run folder's guards: one writer at a time, stale locks taken over, failed writes that lose nothing,
and the checkpoint manager's registry of stateful parts."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time

import pytest
import torch

from hpcgan.train.checkpoint import CheckpointError, CheckpointManager
from hpcgan.train.run_folder import RunFolder, RunLock, RunLockedError

from helpers import cli_env, hpcgan_cmd, run_cli, train_args


def test_second_writer_is_refused_and_a_killed_writers_lock_is_taken_over(image_folder, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(hpcgan_cmd(*train_args(image_folder, out, "train.steps=100000")), env=cli_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not RunFolder(out).metrics_log.exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        second = run_cli(*train_args(image_folder, out, "train.steps=100000"))
        assert second.returncode == 2
        last = second.stderr.strip().splitlines()[-1]
        assert f"is in use by pid {first.pid} on " in last and "another --out folder" in last
        assert first.poll() is None  # the holder trains on, undisturbed
    finally:
        first.kill()
        first.wait()
    assert RunFolder(out).lock_file.exists()  # SIGKILL leaves the lock behind
    resumed = run_cli(*train_args(image_folder, out, "train.steps=3"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"took over the lock of pid {first.pid}" in resumed.stderr and "is gone" in resumed.stderr
    assert not RunFolder(out).lock_file.exists()  # released at the end


def _foreign_lock(path, **fields) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": "node-elsewhere", "pid": 4242, "start": "1", "slurm_job_id": None,
                                "since": 0.0, **fields}))


def test_lock_of_another_host_is_stale_only_when_untouched(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    path = tmp_path / ".lock"
    _foreign_lock(path)
    with pytest.raises(RunLockedError, match="in use by pid 4242 on node-elsewhere"):
        RunLock(path, stale_after_s=600).acquire()
    old = time.time() - 3600
    os.utime(path, (old, old))
    lock = RunLock(path, stale_after_s=600)
    lock.acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()


def test_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    path = tmp_path / ".lock"
    _foreign_lock(path, slurm_job_id="777")
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    with pytest.raises(RunLockedError, match="SLURM job 777"):
        RunLock(path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    lock = RunLock(path)
    lock.acquire()
    assert json.loads(path.read_text())["slurm_job_id"] == "777"
    lock.release()


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return apply


def test_failed_checkpoint_write_names_the_path_and_keeps_the_last_checkpoint(image_folder, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*train_args(image_folder, out, "train.steps=2", "checkpoint.every=2")).returncode == 0
    complete = out / "checkpoints" / "step-0000002"
    before = {p.name: p.read_bytes() for p in complete.iterdir()}
    # The kernel refuses files over 64 kB for this process: the weights file of step 4 cannot be written.
    proc = subprocess.run(hpcgan_cmd(*train_args(image_folder, out, "train.steps=4", "checkpoint.every=2")),
                          env=cli_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size(64_000))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "cannot write checkpoint step 4" in last and str(out / "checkpoints") in last
    assert "MB free" in last and "step 2" in last and "stays resumable" in last
    assert "Traceback" not in proc.stderr
    assert not list((out / "checkpoints").glob(".tmp-step-*"))
    assert {p.name: p.read_bytes() for p in complete.iterdir()} == before
    assert CheckpointManager(out / "checkpoints", keep=3).complete_steps() == [2]
    resumed = run_cli(*train_args(image_folder, out, "train.steps=4", "checkpoint.every=2"))
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr and "step 2 of 4" in resumed.stderr


class Counter:
    """A stateful part that is not a module: what the manager must save with one registration."""

    def __init__(self) -> None:
        self.value, self.history = 0, torch.zeros(3)

    def state_dict(self) -> dict:
        return {"value": self.value, "history": self.history.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.history = state["value"], state["history"]


def test_one_registration_saves_and_loads_a_new_part(tmp_path):
    saved, net = Counter(), torch.nn.Linear(2, 2)
    manager = CheckpointManager(tmp_path / "ckpt", keep=2)
    manager.register("net", net, file="model.pt")
    manager.register("counter", saved, file="train.pt")
    saved.value, saved.history = 7, torch.arange(3.0)
    folder = manager.save(5)
    loaded, net2 = Counter(), torch.nn.Linear(2, 2)
    reader = CheckpointManager(tmp_path / "ckpt", keep=2)
    reader.register("net", net2, file="model.pt")
    reader.register("counter", loaded, file="train.pt")
    assert reader.load(folder) is False  # no per-rank parts registered, so no rank file was written
    assert loaded.value == 7 and torch.equal(loaded.history, torch.arange(3.0))
    assert torch.equal(net2.weight, net.weight)
    stranger = CheckpointManager(tmp_path / "ckpt", keep=2)
    stranger.register("augment", Counter(), file="train.pt")
    with pytest.raises(CheckpointError, match="train.pt holds no 'augment' state"):
        stranger.load(folder)


def test_kept_folder_layout_is_spelled_by_the_owner_only():
    import hpcgan

    package = os.path.dirname(hpcgan.__file__)
    names = ["config.yaml", "metrics.jsonl", "tracking.json", "manifest.json", "utility.json", "utility.png"]
    hits = {name: [] for name in names}
    for root, _, files in os.walk(package):
        for file in files:
            if file.endswith(".py"):
                text = open(os.path.join(root, file)).read()
                for name in names:
                    if f'"{name}"' in text:
                        hits[name].append(file)
    assert all(len(where) == 1 for where in hits.values()), hits
