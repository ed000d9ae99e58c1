"""Smoke tests of the local single-node SLURM from slurm/local/start.sh.

Run: sudo slurm/local/start.sh && pytest -m slurm tests/test_slurm_cluster.py  (~20 s)
Skipped when no SLURM controller answers `sinfo`.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm


def _run(*cmd: str, timeout: float = 20) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout).stdout.strip()


@pytest.fixture(scope="module", autouse=True)
def _cluster(slurm_cluster):
    """Every test here needs the cluster (see conftest.slurm_cluster)."""


def _wait(pred, timeout: float, what: str, step: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _sacct_state(job_id: str) -> str:
    # sacct lags a moment behind the controller (the job record reaches slurmdbd
    # asynchronously): callers poll. -X: the allocation only; without -D the latest run.
    out = _run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State")
    return out.splitlines()[-1].strip() if out else ""


def _squeue_state(job_id: str) -> str:
    return _run("squeue", "-h", "-j", job_id, "-o", "%T")


def _sbatch(tmp_path: Path, *args: str) -> str:
    return _run("sbatch", "--parsable", f"--chdir={tmp_path}", *args).split(";")[0]


@pytest.fixture
def jobs():
    ids: list[str] = []
    yield ids
    if ids:  # never leave a sleeping job behind
        subprocess.run(["scancel", *ids], capture_output=True, timeout=20)


def test_node_is_up():
    states = _run("sinfo", "-h", "-N", "-o", "%t").split()
    assert states, "sinfo lists no node"
    assert any(s.rstrip("*~#") in {"idle", "mix", "alloc"} for s in states), states


def test_sbatch_job_completes_in_sacct(tmp_path, jobs):
    cpus = int(_run("sinfo", "-h", "-N", "-o", "%c").split()[0])
    ntasks = min(2, cpus)
    job = _sbatch(
        tmp_path, f"--ntasks-per-node={ntasks}", "--cpus-per-task=1", "-o", "out.txt",
        "--wrap", "srun hostname; sleep 1",
    )
    jobs.append(job)
    state = _wait(lambda: (s := _sacct_state(job)) in {"COMPLETED", "FAILED", "CANCELLED"} and s,
                  30, f"job {job} to finish")
    assert state == "COMPLETED", (state, (tmp_path / "out.txt").read_text(errors="replace"))
    assert len((tmp_path / "out.txt").read_text().split()) == ntasks  # one hostname per task


def test_requeued_job_runs_again(tmp_path, jobs):
    # First run sleeps until requeued; the second run (SLURM_RESTART_COUNT=1) finishes.
    job = _sbatch(
        tmp_path, "--requeue", "--open-mode=append", "-o", "out.txt",
        "--wrap", 'echo "run ${SLURM_RESTART_COUNT:-0}" >> runs.txt; '
                  '[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] || sleep 120',
    )
    jobs.append(job)
    runs = tmp_path / "runs.txt"
    _wait(lambda: _squeue_state(job) == "RUNNING" and runs.exists(), 20, f"job {job} to run")
    _run("scontrol", "requeue", job)
    # ~12 s locally: the node may take the job again only after cred_expire (10 s).
    _wait(lambda: _sacct_state(job) == "COMPLETED", 40, f"requeued job {job} to complete")
    assert runs.read_text().split("\n")[:2] == ["run 0", "run 1"], runs.read_text()
