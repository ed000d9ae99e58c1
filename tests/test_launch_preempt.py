"""Preemption of a 2-rank job with data worker processes on the real local SLURM: SIGTERM to every process
of the job step (`scontrol requeue`, as preemption sends it), and a data worker of rank 1 killed.
Both end in a checkpoint and exit 75 on every rank, and the run ends on the weights of one never
interrupted."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from data_factories import make_shards
from helpers import assert_identical, final_weights
from test_launch import finish, job_id, sacct_states, submit, wait_for_step

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 40
# Ranks agree on an interrupt every step: the save must fit in the local cluster's KillWait (10 s).
READER = ("data.reader=webdataset", "data.workers=2", "train.sync_every=1")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    make_shards(folder, n_train=160, sizes=(64,), shard_size=40)  # 20 batches: workers are mid-epoch at step 12
    return folder


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, shards, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("straight")
    finish(submit(tmp, tmp / "run", "--wait", data=shards, steps=STEPS, extra=READER), timeout=900)
    return final_weights(tmp / "run")


def rank_logs(out: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in (out / "submitit").glob("*/*/*_log.err"))


def task_process(out: Path, rank: int, timeout: float = 60) -> psutil.Process:
    """The submitit task of global rank `rank` of the job whose run folder is `out`, once it has its two data
    workers (they start anew each epoch)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc in psutil.process_iter(["cmdline"]):
            try:
                cmd = proc.info["cmdline"] or []
                if cmd[:1] != [sys.executable] or "submitit.core._submit" not in cmd or str(out) not in " ".join(cmd):
                    continue
                if proc.environ().get("SLURM_PROCID") == str(rank) and proc.parent().name() != proc.name() \
                        and len(proc.children()) == 2:
                    return proc
            except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
                continue
        time.sleep(0.2)
    raise AssertionError(f"no task of rank {rank} with two data workers for {out}")


def test_requeue_sigterms_every_process_of_the_job(shards, tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = submit(tmp_path, out, "--wait", data=shards, steps=STEPS, extra=READER)
    jid = job_id(proc)
    wait_for_step(out, 12)
    task_process(out, 1)  # its data workers run in the job step with it, and get the SIGTERM too
    subprocess.run(["scontrol", "requeue", jid], check=True)
    finish(proc, timeout=900)
    assert "REQUEUED" in sacct_states(jid)
    logs = rank_logs(out)
    assert "exited unexpectedly" not in logs and "Traceback" not in logs, logs[-3000:]
    assert "interrupted by signal SIGTERM" in logs and "checkpoint saved, exiting with 75" in logs
    assert_identical(final_weights(out), uninterrupted)


def test_a_killed_worker_of_rank_1_requeues_the_job(shards, tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = submit(tmp_path, out, "--wait", data=shards, steps=STEPS, extra=READER)
    jid = job_id(proc)
    wait_for_step(out, 12)
    task_process(out, 1).children()[0].send_signal(signal.SIGKILL)
    finish(proc, timeout=900)
    assert "REQUEUED" in sacct_states(jid)
    logs = rank_logs(out)
    assert "a data worker died" in logs and "submitit requeues the job" in logs
    state = json.loads(sorted((out / "checkpoints").glob("step-*/state.json"))[-1].read_text())
    assert state["step"] == STEPS and state["restarts"] >= 1
    assert_identical(final_weights(out), uninterrupted)
