"""launch/submit.py without SLURM: option parsing, and the local executor path the README uses."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hpcgan.launch.submit import LaunchError, parse_mem_gb, parse_time, point_name, sweep_points

from helpers import REPO, TINY, cli_env, final_weights


@pytest.mark.parametrize("text, minutes", [("90", 90), ("30:00", 30), ("24:00:00", 1440), ("1-12:00:00", 2160),
                                           ("2-0", 2880), ("00:00:30", 1)])
def test_slurm_time_formats(text, minutes):
    assert parse_time(text) == minutes


def test_bad_options_are_one_line_errors():
    with pytest.raises(LaunchError, match="--time 'soon'"):
        parse_time("soon")
    with pytest.raises(LaunchError, match="--mem 'lots'"):
        parse_mem_gb("lots")
    with pytest.raises(LaunchError, match="--sweep 'train.lr'"):
        sweep_points(["train.lr"])
    assert parse_mem_gb("512M") == 0.5 and parse_mem_gb("64G") == 64


def test_sweep_is_the_cartesian_product():
    points = sweep_points(["train.lr=1e-4,2e-4", "model.ngf=32,64"])
    assert len(points) == 4 and {"train.lr": "2e-4", "model.ngf": "32"} in points
    assert point_name(points[0]) == "lr-1e-4_ngf-32"


@pytest.mark.slow
def test_local_executor_runs_the_same_job_code(image_folder, tmp_path):
    out = tmp_path / "run"
    sets = [a for kv in [*TINY, "train.steps=4", "track.enabled=true"] for a in ("--set", kv)]
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--cluster", "local", "--", "--data",
                           str(image_folder), "--out", str(out), *sets], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(local): run folder" in proc.stdout and "finished at step 4" in proc.stdout
    assert "MLflow run " in proc.stdout and (tmp_path / "mlflow.db").exists()
    assert final_weights(out)
