"""The progress line and the job's time left (SLURM's %L formats)."""

from __future__ import annotations

import time

import pytest

from hpcgan.train.deadline import format_duration, job_end_time, parse_time_left, progress_line


@pytest.mark.parametrize("text,seconds", [
    ("1-02:03:04", 93784), ("02:03:04", 7384), ("02:03", 123), ("7", 420), ("0:00", 0), ("3-00", 259200),
    ("1-02:03", 93780), (" 12:00:00\n", 43200),
])
def test_slurm_time_left_formats(text, seconds):
    assert parse_time_left(text) == seconds


@pytest.mark.parametrize("text", ["UNLIMITED", "NOT_SET", "INVALID", "", "soon", "1:2:3:4"])
def test_no_limit_or_not_a_time_is_none(text):
    assert parse_time_left(text) is None


def test_job_end_from_the_environment_or_none():
    assert job_end_time({"SLURM_JOB_END_TIME": "1900000000"}) == 1900000000.0
    assert job_end_time({}) is None  # not a SLURM job: no limit shown
    assert job_end_time({"SLURM_JOB_ID": "999999999", "PATH": "/nonexistent"}) is None  # no squeue: no limit


def test_durations():
    assert [format_duration(s) for s in (0, 95, 3725, 200000, -5)] == ["0m00s", "1m35s", "1h02m", "2d07h", "0m00s"]


RECORD = {"loss_d": 1.25, "loss_g": 0.5, "d_real": 0.75, "d_fake": 0.25, "images_per_s": 128.0}


def test_progress_line_shows_images_eta_and_job_left():
    now = time.time()
    line = progress_line(100, 1000, 12_800, RECORD, 128, job_end=now + 3 * 3600 + 600, now=now)
    assert line == ("step 100/1000  12.8k img  loss_d 1.2500  loss_g 0.5000  D(x) 0.750  D(G(z)) 0.250  "
                    "128.0 img/s  ETA 15m00s  job left 3h10m")


def test_progress_line_marks_a_run_longer_than_its_job_and_omits_an_unknown_limit():
    now = time.time()
    assert progress_line(0, 10_000, 0, RECORD, 128, job_end=now + 60, now=now).endswith(
        "ETA 2h46m  job left 1m00s (the run needs another job)")
    assert progress_line(0, 10_000, 0, RECORD, 128, job_end=None).endswith("128.0 img/s  ETA 2h46m")
