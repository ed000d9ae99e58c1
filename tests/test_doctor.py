"""`hpcgan doctor`: passes on this machine and in a real 2-task SLURM job (gloo across ranks), and each
broken precondition that can be made here fails with one line naming it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpcgan.config import build_config
from hpcgan.doctor import check_mlflow, check_partition, check_run_folder, check_time_limit, gpus_in

from helpers import REPO, TINY, cli_env, free_port, run_cli


def verdicts(stdout: str) -> dict[str, str]:
    """check name -> its line, from doctor's output (prefixes like '[host rank 0]' dropped)."""
    lines = {}
    for line in stdout.splitlines():
        if line.startswith("["):
            line = line.split("] ", 1)[-1]
        if line[:4].strip() in ("ok", "warn", "fail"):
            lines[line[5:].split(":", 1)[0]] = line
    return lines


def test_doctor_passes_on_this_machine(tmp_path):
    proc = run_cli("doctor", "--out", str(tmp_path / "run"), "--json", str(tmp_path / "v.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = verdicts(proc.stdout)
    assert {"devices", "precision", "dali", "run folder", "disk", "mlflow"} <= lines.keys(), proc.stdout
    assert not [line for line in lines.values() if line.startswith("fail")]
    assert proc.stdout.splitlines()[-1].startswith("doctor: 0 failed")
    assert {c["name"] for c in json.loads((tmp_path / "v.json").read_text())} == lines.keys()


def test_each_broken_precondition_is_one_failing_line(tmp_path):
    port = free_port()  # nobody listens
    proc = run_cli("doctor", "--out", str(tmp_path / "run"), "--set", f"track.uri=http://127.0.0.1:{port}",
                   "--set", "checkpoint.keep=100000000", "--set", "checkpoint.every=500", "--time", "10:00",
                   "--step-time", "2", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = verdicts(proc.stdout)
    assert lines["mlflow"].startswith(f"fail mlflow: http://127.0.0.1:{port} unreachable")
    assert lines["disk"].startswith("fail disk:") and "lower checkpoint.keep" in lines["disk"]
    assert lines["time limit"] == (
        "fail time limit: time limit 10m00s, checkpoint every 500 steps x 2 s = 16m40s: the job ends before its "
        "first checkpoint -> set checkpoint.every=150 or raise --time")
    assert proc.stdout.splitlines()[-1].startswith("doctor: 3 failed")
    assert "Traceback" not in proc.stdout + proc.stderr


def test_run_folder_that_cannot_be_created_fails(tmp_path):
    (tmp_path / "file").write_text("in the way")
    check = check_run_folder(tmp_path / "file" / "run")
    assert check.verdict == "fail" and check.line().startswith(f"fail run folder: {tmp_path / 'file' / 'run'} is not "
                                                               "writable")
    assert check_run_folder(tmp_path / "a" / "b", tidy=True).verdict == "ok" and not (tmp_path / "a").exists()


def test_sqlite_store_and_disabled_tracking_pass():
    cfg = build_config(overrides=["track.uri=sqlite:////tmp/x/mlflow.db"])
    assert check_mlflow(cfg, several_jobs=True).verdict == "ok"  # /tmp is a local file system
    assert check_mlflow(build_config(overrides=["track.enabled=false"]), False).verdict == "ok"


@pytest.mark.parametrize("text,count", [
    ("gpu:a100:4(S:0-1)", 4), ("gpu:4", 4), ("gpu:h100:8,shard:16", 8), ("(null)", 0), ("", None), ("4", 4),
    ("gpu:a100:2(S:0),gpu:v100:1(S:1)", 3), ("gpu", 1), ("a100:2", 2), ("a100:2,v100:1", 3), ("many", None),
])
def test_gpus_of_a_slurm_value(text, count):
    assert gpus_in(text) == count


def test_time_limit_without_a_step_time_warns_only_when_very_short():
    cfg = build_config()
    assert check_time_limit(3600, cfg, None).verdict == "ok"
    assert check_time_limit(120, cfg, None).verdict == "warn"
    assert check_time_limit(None, cfg, None) is None


@pytest.mark.slurm
def test_partition_with_fewer_gpus_than_requested_fails(slurm_cluster):
    check = check_partition("debug", 2)
    assert check.line() == ("fail partition: debug has 0 GPU(s) per node, 2 requested -> pick a GPU partition "
                            "(sinfo -o '%P %G')")
    assert check_partition("debug", 0) is None


def test_submission_that_cannot_work_is_refused_in_one_line(image_folder, tmp_path):
    out = tmp_path / "sub" / "run"
    cmd = [sys.executable, str(REPO / "launch" / "submit.py"), "--cluster", "local", "--", "--data",
           str(image_folder), "--out", str(out), *[a for kv in (*TINY, "checkpoint.keep=100000000")
                                                  for a in ("--set", kv)]]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch/submit.py: error: doctor: fail disk:"), proc.stderr
    assert lines[0].endswith("(--skip-doctor submits anyway)")
    assert not (tmp_path / "sub").exists()  # nothing left behind


@pytest.mark.slurm
@pytest.mark.slow
def test_doctor_in_a_two_task_slurm_job_checks_gloo_and_the_shared_folder(slurm_cluster, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(["srun", "-n", "2", "-t", "10", "--cpus-per-task", "1", sys.executable, "-m", "hpcgan",
                           "doctor", "--out", str(out)], cwd=tmp_path, env=cli_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = verdicts(proc.stdout)
    assert lines["ranks"].startswith("ok   ranks: gloo across 2 ranks"), proc.stdout
    assert lines["shared run folder"].startswith(f"ok   shared run folder: {out}: seen by all 2 ranks on 1 node(s)")
    assert lines["time limit"].startswith(("ok   time limit: time limit 9m", "ok   time limit: time limit 10m00s"))
