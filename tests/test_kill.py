"""SIGKILL at random moments, including mid-save: every restart resumes from an intact checkpoint
and the run ends bit-identical to one that was never interrupted."""

from __future__ import annotations

import random
import subprocess
import time

import pytest

from helpers import assert_identical, cli_env, final_weights, hpcgan_cmd, run_cli, train_args

pytestmark = pytest.mark.slow

STEPS = 30


def args(data, out):
    return train_args(data, out, f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=2")


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> bool:
    """SIGKILL `proc` as soon as `ready()` holds; False if it finished first."""
    deadline = time.time() + timeout
    while proc.poll() is None:
        if ready():
            proc.kill()
            proc.wait()
            return True
        assert time.time() < deadline
    return False


def test_random_sigkills_never_break_resume(image_folder, tmp_path):
    reference = tmp_path / "reference"
    assert run_cli(*args(image_folder, reference)).returncode == 0
    out, rng = tmp_path / "run", random.Random(1234)
    metrics = out / "metrics.jsonl"
    kills = mid_save = 0
    for attempt in range(8):
        proc = subprocess.Popen(hpcgan_cmd(*args(image_folder, out)), env=cli_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if attempt % 3 == 1:  # aim at a checkpoint being written: its temp folder exists
            killed = kill_when(proc, lambda: any((out / "checkpoints").glob(".tmp-step-*")))
            mid_save += killed
        else:  # some steps after this attempt's first logged step
            start = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            target = start + rng.randint(1, 5)
            killed = kill_when(proc, lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= target)
        kills += killed
        if not killed:
            assert proc.returncode == 0
            break
    assert kills >= 4 and mid_save >= 1, (kills, mid_save)
    finished = run_cli(*args(image_folder, out))  # completes the run, or finds it complete
    assert finished.returncode == 0, finished.stderr
    assert_identical(final_weights(out), final_weights(reference))

