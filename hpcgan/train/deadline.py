"""How long the run has left, and how long the job has: the two numbers a user checks on a cluster.

The job's end is asked once at start (SLURM_JOB_END_TIME, else `squeue %L`), never per step: a scheduler
query is a controller RPC, and thousands of ranks polling it would load the controller."""

from __future__ import annotations

import os
import re
import subprocess
import time

_UNBOUNDED = {"UNLIMITED", "NOT_SET", "INVALID", "N/A", ""}


def parse_time_left(text: str) -> float | None:
    """SLURM's time format ('1-02:03:04', '02:03:04', '02:03' = MM:SS, '7' = minutes, 'UNLIMITED') ->
    seconds; None when the job has no limit or the text is not a time."""
    text = text.strip()
    if text.upper() in _UNBOUNDED:
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        return None
    days, *fields = match.groups()
    parts = [int(f) for f in fields if f is not None]
    if days is not None:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    elif len(parts) == 2:
        hours, minutes, seconds = 0, *parts
    else:
        hours, minutes, seconds = 0, parts[0], 0
    return float(((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds)


def job_end_time(env: dict[str, str] | None = None) -> float | None:
    """Epoch seconds at which the scheduler ends this job; None outside SLURM or without a limit."""
    env = os.environ if env is None else env
    if env.get("SLURM_JOB_END_TIME", "").isdigit():
        return float(env["SLURM_JOB_END_TIME"])
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        proc = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    left = parse_time_left(proc.stdout.splitlines()[0]) if proc.returncode == 0 and proc.stdout.strip() else None
    return None if left is None else time.time() + left


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m'; 95 -> '1m35s'; 200000 -> '2d07h'."""
    s = max(int(seconds), 0)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"


def format_count(n: int) -> str:
    """12800 -> '12.8k'; 3_400_000 -> '3.40M'."""
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 1000:
        return f"{n / 1e3:.1f}k"
    return str(n)


def run_eta(step: int, total: int, batch_size: int, images_per_s: float) -> float | None:
    """Seconds to the run's last step at the current speed."""
    return (total - step) * batch_size / images_per_s if images_per_s > 0 else None


def job_left(job_end: float | None, eta: float | None, now: float | None = None) -> str:
    """'job left 3h10m', marked when the run will not finish within this job; '' without a limit."""
    if job_end is None:
        return ""
    left = job_end - (time.time() if now is None else now)
    return f"job left {format_duration(left)}" + (" (the run needs another job)" if eta is not None and eta > left
                                                   else "")


def progress_line(step: int, total: int, images_seen: int, record: dict[str, float], batch_size: int,
                  job_end: float | None, now: float | None = None) -> str:
    """One console line per log interval: step, images seen, losses, speed, the run's ETA and the job's
    time left."""
    eta = run_eta(step, total, batch_size, record["images_per_s"])
    parts = [f"step {step}/{total}", f"{format_count(images_seen)} img", f"loss_d {record['loss_d']:.4f}",
             f"loss_g {record['loss_g']:.4f}", f"D(x) {record['d_real']:.3f}", f"D(G(z)) {record['d_fake']:.3f}",
             f"{record['images_per_s']:.1f} img/s", f"ETA {format_duration(eta)}" if eta is not None else "",
             job_left(job_end, eta, now)]
    return "  ".join(p for p in parts if p)
