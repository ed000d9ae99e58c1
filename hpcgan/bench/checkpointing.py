"""Checkpoint save and restore times, and the time from an interrupt signal to the process's exit.

Restore is timed as resume does it: a fresh Trainer on the run folder finds the latest checkpoint and
loads it (`fit()` with nothing left to train returns right after). The interrupt is measured on a real
`hpcgan train` process, at several moments of a step; the slowest is what a scheduler's grace period
has to cover.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hpcgan.config import Config, build_config, flatten, to_dict
from hpcgan.train import EXIT_INTERRUPTED, Trainer
from hpcgan.train.checkpoint import CheckpointManager, is_complete
from hpcgan.train.run_folder import RunFolder


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6


def save_and_restore(trainer: Trainer) -> dict[str, float]:
    """Save `trainer`'s state (it must have trained), then restore it into a fresh Trainer."""
    start = time.perf_counter()
    path = trainer.save_checkpoint()
    save_s = time.perf_counter() - start
    cfg = build_config(base=to_dict(trainer.cfg), overrides=[f"train.steps={trainer.state.step}"])
    fresh = Trainer(cfg, trainer.run.root)
    start = time.perf_counter()
    fresh.fit()
    restore_s = time.perf_counter() - start
    if fresh.state.step != trainer.state.step:
        raise RuntimeError(f"restore from {path} reached step {fresh.state.step}, not {trainer.state.step}")
    return {"save_s": save_s, "restore_s": restore_s, "mb": folder_mb(path), "step": trainer.state.step}


def signal_to_exit(cfg: Config, run_dir: Path, phases: list[float], after_steps: int = 2,
                   timeout: float = 600.0) -> dict[str, Any]:
    """Interrupt one `hpcgan train` process per phase; the slowest trial is the figure.

    A phase is a fraction of a step: SIGUSR1 goes out that long (by the previous step's time) after step
    `after_steps` is logged, past the first steps, which are slower while the process's memory warms up.
    Early in a step the trainer undoes it and saves at once; past D's update it must finish the step.
    """
    trials = [_interrupt_once(cfg, run_dir.with_name(f"{run_dir.name}-{i}"), phase, after_steps, timeout)
              for i, phase in enumerate(phases)]
    seconds = [t["signal_to_exit_s"] for t in trials]
    return {"signal_to_exit_s": max(seconds), "median_s": statistics.median(seconds), "exit_code": EXIT_INTERRUPTED,
            "step_s": statistics.median(t["step_s"] for t in trials), "trials": trials}


def _interrupt_once(cfg: Config, run_dir: Path, phase: float, after_steps: int, timeout: float) -> dict[str, Any]:
    settings = {**_non_defaults(cfg), "train.steps": 1_000_000, "train.log_every": 1,
                "train.sample_every": 1_000_000, "checkpoint.every": 1_000_000, "track.enabled": False}
    cmd = [sys.executable, "-m", "hpcgan", "train", "--out", str(run_dir),
           *[arg for key, value in settings.items() for arg in ("--set", f"{key}={json.dumps(value)}")]]
    log_file = run_dir.with_suffix(".log")
    metrics = RunFolder(run_dir).metrics_log
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + timeout
            while not (metrics.exists() and len(lines := metrics.read_text().splitlines()) >= after_steps):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"hpcgan train ended or stalled before step {after_steps}; see {log_file}")
                time.sleep(0.005)
            logged = json.loads(lines[-1])
            step_s = cfg.train.batch_size / logged["images_per_s"]
            time.sleep(phase * step_s)
            start = time.perf_counter()
            proc.send_signal(signal.SIGUSR1)
            code = proc.wait(timeout=timeout)
            elapsed = time.perf_counter() - start
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    latest = CheckpointManager(RunFolder(run_dir).checkpoints, keep=1).latest()
    if code != EXIT_INTERRUPTED or latest is None or not is_complete(latest):
        raise RuntimeError(f"hpcgan train exited {code} without a complete checkpoint; see {log_file}")
    saved = CheckpointManager.read_state(latest)["step"]
    return {"phase": phase, "signal_to_exit_s": elapsed, "step_s": step_s, "checkpoint": latest.name,
            "step_undone": saved == logged["step"]}


def _non_defaults(cfg: Config) -> dict[str, Any]:
    """The dotted keys where `cfg` differs from the defaults, to hand on as --set."""
    default = flatten(Config())
    return {key: value for key, value in flatten(cfg).items() if default.get(key) != value}
