"""Preemption as SLURM delivers it: SIGTERM to every process of the job step, data workers included, and
a data worker that dies anyway. Each ends in a checkpoint and exit 75, and the resumed run ends
bit-identical to one that was never interrupted, with every reader."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from data_factories import make_shards
from helpers import assert_identical, cli_env, final_weights, hpcgan_cmd, run_cli, train_args

pytestmark = pytest.mark.slow

STEPS = 16
EXIT_INTERRUPTED = 75
READERS = {"memory": ["data.reader=memory"], "webdataset": ["data.reader=webdataset", "data.workers=2"],
           "dali": ["data.reader=dali", "data.workers=2"]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    # 20 batches per epoch, more than a run's 16 steps: a killed worker always still had batches to serve.
    make_shards(folder, n_train=160, sizes=(64,), shard_size=16)
    return folder


def args(data: Path, out: Path, reader: str) -> list[str]:
    return train_args(data, out, f"train.steps={STEPS}", "checkpoint.every=1000", *READERS[reader])


def start(data: Path, out: Path, reader: str) -> subprocess.Popen:
    """`hpcgan train` as the leader of its own process group, as srun starts a task."""
    return subprocess.Popen(hpcgan_cmd(*args(data, out, reader)), env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 120) -> None:
    metrics, deadline = out / "metrics.jsonl", time.time() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= step):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, f"training did not reach step {step}"
        time.sleep(0.05)


def reference(data: Path, tmp_path: Path, reader: str) -> dict:
    out = tmp_path / "reference"
    done = run_cli(*args(data, out, reader))
    assert done.returncode == 0, done.stderr
    return final_weights(out)


def resume_matches(data: Path, out: Path, reader: str, expected: dict) -> None:
    done = run_cli(*args(data, out, reader))
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stderr
    assert_identical(final_weights(out), expected)


@pytest.mark.parametrize("reader", list(READERS))
def test_sigterm_to_the_process_group_checkpoints_and_resumes_exactly(shards, tmp_path, reader):
    if reader == "dali":
        pytest.importorskip("nvidia.dali")
    expected = reference(shards, tmp_path, reader)
    out = tmp_path / "run"
    proc = start(shards, out, reader)
    wait_for_step(proc, out, 4)
    group = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    if reader == "webdataset":
        assert len(group) >= 3, "the data workers run as processes of the group"
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err and "exited unexpectedly" not in err, err
    assert "interrupted by signal SIGTERM" in err
    resume_matches(shards, out, reader, expected)


def test_a_killed_data_worker_ends_in_a_checkpoint_and_exit_75(shards, tmp_path):
    expected = reference(shards, tmp_path, "webdataset")
    out = tmp_path / "run"
    proc = start(shards, out, "webdataset")
    wait_for_step(proc, out, 4)
    workers = psutil.Process(proc.pid).children()
    assert workers, "no data worker to kill"
    os.kill(workers[0].pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err, err
    assert "a data worker died" in err and "interrupted by a data worker's death" in err
    step = len((out / "metrics.jsonl").read_text().splitlines())
    assert (out / "checkpoints" / f"step-{step:07d}").is_dir()  # the last finished step
    resume_matches(shards, out, "webdataset", expected)
