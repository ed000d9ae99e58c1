"""launch/submit.py against the real local SLURM: runs, requeues, preemption, sweeps, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import REPO, TINY, assert_identical, cli_env, final_weights

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 120


def submit(tmp_path: Path, out: Path, *launch: str, steps: int = STEPS, data=None, extra=()) -> subprocess.Popen:
    sets = [*TINY, f"train.steps={steps}", "checkpoint.every=40", "track.enabled=true", "track.log_model=false",
            f"track.uri=sqlite:///{tmp_path / 'mlflow.db'}", "track.experiment=launch", *extra]
    cmd = [sys.executable, str(REPO / "launch" / "submit.py"), "--cluster", "slurm", "--tasks-per-node", "2",
           "--time", "15", *launch, "--", "--data", str(data), "--out", str(out),
           *[a for kv in sets for a in ("--set", kv)]]
    return subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def job_id(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    assert line.startswith("job "), line + proc.stderr.read()
    return line.split()[1]


def sacct_states(jid: str, until: str = "COMPLETED", timeout: float = 30) -> str:
    """The job's state history (-D: requeues included); sacct lags the controller, so poll a little."""
    deadline = time.time() + timeout
    while True:
        states = subprocess.run(["sacct", "-n", "-X", "-P", "-D", "-j", jid, "-o", "State"], capture_output=True,
                                text=True).stdout
        if until in states or time.time() > deadline:
            return states
        time.sleep(1)


def wait_for_step(out: Path, step: int, timeout: float = 180) -> None:
    """Block until rank 0 has logged `step` in this (possibly requeued) job."""
    metrics, deadline = out / "metrics.jsonl", time.time() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= step):
        assert time.time() < deadline, f"training did not reach step {step}"
        time.sleep(0.05)


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out + err
    return out + err


def one_mlflow_run(tmp_path: Path) -> str:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("launch").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    assert runs[0].info.status == "FINISHED"
    return runs[0].info.run_id


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, image_folder, tmp_path_factory):
    """A 2-task gloo training that completes; every interrupted run must end on its weights."""
    tmp = tmp_path_factory.mktemp("straight")
    out = tmp / "run"
    proc = submit(tmp, out, "--wait", data=image_folder)
    jid = job_id(proc)
    log = finish(proc)
    assert "finished at step" in log and "MLflow run" in log
    assert "COMPLETED" in sacct_states(jid)
    ckpt = out / "checkpoints" / f"step-{STEPS:07d}"
    assert sorted(p.name for p in ckpt.glob("rank-*.pt")) == ["rank-00000.pt", "rank-00001.pt"]
    one_mlflow_run(tmp)
    return final_weights(out)


def test_completes_on_slurm_with_two_ranks(uninterrupted):
    assert any(k.startswith("G_ema.") for k in uninterrupted)


@pytest.mark.parametrize("how", ["scontrol requeue", "time-limit signal"])
def test_preempted_run_requeues_and_resumes_exactly(how, image_folder, tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = submit(tmp_path, out, "--wait", data=image_folder)
    jid = job_id(proc)
    # srun may SIGKILL the tasks right after `scontrol requeue`: past step 40 the periodic
    # checkpoint is what the requeued job must resume from.
    wait_for_step(out, 50)
    if how == "scontrol requeue":
        subprocess.run(["scontrol", "requeue", jid], check=True)
    else:  # what SLURM sends --signal-delay seconds before the time limit
        subprocess.run(["scancel", "--signal=USR2", jid], check=True)
    finish(proc)
    state = json.loads(sorted((out / "checkpoints").glob("step-*/state.json"))[-1].read_text())
    assert state["step"] == STEPS and state["restarts"] >= 1
    assert_identical(final_weights(out), uninterrupted)
    run_id = one_mlflow_run(tmp_path)
    history = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(run_id, "restarts")
    assert history and history[-1].value >= 1


def test_partition_priority_preemption(image_folder, tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = submit(tmp_path, out, "--wait", "--partition", "debug", data=image_folder)
    job_id(proc)
    wait_for_step(out, 50)
    high = subprocess.run(["sbatch", "--parsable", "-p", "high", "-n", "2", "-o", str(tmp_path / "high.out"),
                           "--wrap", "sleep 3"], capture_output=True, text=True, check=True).stdout.strip()
    finish(proc)
    assert "COMPLETED" in sacct_states(high)
    assert json.loads(sorted((out / "checkpoints").glob("step-*/state.json"))[-1].read_text())["restarts"] >= 1
    assert_identical(final_weights(out), uninterrupted)
    one_mlflow_run(tmp_path)


def test_sweep_is_one_job_array_with_a_run_per_point(slurm_cluster, image_folder, tmp_path):
    out = tmp_path / "sweep"
    proc = submit(tmp_path, out, "--wait", "--sweep", "train.lr=1e-4,3e-4", data=image_folder, steps=4)
    jobs = [line.split()[1] for line in finish(proc).splitlines() if line.startswith("job ") and "run folder" in line]
    assert len(jobs) == 2 and len({j.split("_")[0] for j in jobs}) == 1, jobs  # one array job, two tasks
    assert {p.name for p in out.iterdir() if (p / "checkpoints").exists()} == {"lr-1e-4", "lr-3e-4"}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("launch").experiment_id])
    assert sorted(r.data.params["train.lr"] for r in runs) == ["0.0001", "0.0003"]


def run_submit(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), *args], capture_output=True,
                          text=True, env=env or cli_env(), timeout=120)


def test_bad_input_gives_one_line_before_submitting(slurm_cluster, image_folder, tmp_path):
    train = ["--", "--data", str(image_folder), "--out", str(tmp_path / "run")]
    cases = {
        "--partition nosuch": ("no such partition", ["--cluster", "slurm", "--partition", "nosuch", *train]),
        "impossible": ("SLURM refused the job", ["--cluster", "slurm", "--mem", "100T", *train]),
        "missing data": ("x does not exist: pass --data", ["--cluster", "slurm", "--", "--data", str(tmp_path / "x"),
                                                      "--out", str(tmp_path / "run")]),
        "bad key": ("unknown config key 'train.lrr'", ["--cluster", "slurm", *train, "--set", "train.lrr=1"]),
    }
    for name, (message, args) in cases.items():
        proc = run_submit(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (name, proc.stderr)
    no_sbatch = cli_env(PATH=str(Path(sys.executable).parent))
    proc = run_submit("--cluster", "slurm", *train, env=no_sbatch)
    assert proc.returncode == 2 and "sbatch is not on PATH" in proc.stderr
    assert not (tmp_path / "run").exists()
