"""What a run reports as it trains: step statistics summed on the device, turned into one record per
log interval (the loop's only host sync), written to the run folder's metrics log and to MLflow."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import torch

from hpcgan.config import Config
from hpcgan.train.run_folder import RunFolder
from hpcgan.train.samples import generate, grid_labels, save_grid
from hpcgan.train.state import TrainState

log = logging.getLogger(__name__)

STAT_NAMES = ("loss_d", "loss_g", "d_real", "d_fake", "d_fake_g")


class StepStats:
    """Running sums of the per-step statistics and the clock for images/s."""

    def __init__(self, device: torch.device, images_seen: int) -> None:
        self._sum = torch.zeros(len(STAT_NAMES), device=device)
        self._count = 0
        self.restart_clock(images_seen)

    def add(self, stats: torch.Tensor) -> None:
        self._sum += stats
        self._count += 1

    def restart_clock(self, images_seen: int) -> float:
        """Start timing images/s afresh; returns the seconds since the clock last started."""
        now = time.perf_counter()
        elapsed = now - getattr(self, "_since", now)
        self._since, self._images = now, images_seen
        return elapsed

    def sync(self) -> None:
        """Wait for the device work behind the sums (e.g. compiled kernels)."""
        self._sum.cpu()

    def record(self, images_seen: int, epoch_images: int) -> dict[str, float]:
        """Means since the last record, images/s and epochs; resets the sums."""
        values = (self._sum / max(self._count, 1)).tolist()
        now = time.perf_counter()
        stats = dict(zip(STAT_NAMES, values))
        stats["images_per_s"] = (images_seen - self._images) / max(now - self._since, 1e-9)
        stats["epoch"] = images_seen / epoch_images
        self._sum.zero_()
        self._count = 0
        self.restart_clock(images_seen)
        return stats


class Reporter:
    """A run's outputs as it trains: the metrics log and MLflow (global rank 0), fixed-noise sample grids,
    in-loop quality metrics (every rank takes part; rank 0 writes) and the console line or progress bar."""

    def __init__(self, cfg: Config, run: RunFolder, device: torch.device, is_main: bool) -> None:
        self.cfg, self.run, self.device, self.is_main = cfg, run, device, is_main
        self.tracker: Any = None
        self.metrics: Any = None
        self.eval_s: float | None = None  # what the last in-loop evaluation cost
        self.fixed_noise = torch.randn(64, cfg.model.nz, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
        classes = cfg.model.num_classes  # a conditional grid shows every class, one per row
        self.fixed_labels = grid_labels(64, classes).to(device) if classes else None
        self._bar: Any = None

    def start(self, state: TrainState, precision: str, total: int) -> None:
        """Open tracking (continuing the state's MLflow run), in-loop metrics and the progress bar."""
        step = state.step
        if self.is_main and self.cfg.track.enabled:
            self.tracker = start_tracking(self.cfg, self.run, state.mlflow_run_id, precision)
            state.mlflow_run_id = self.tracker.run_id
        if state.restarts:
            self.write(step, state.images_seen, {"restarts": state.restarts})
        if self.cfg.metrics.every > 0:  # a run shorter than metrics.every still evaluates its last step
            from hpcgan.train.evaluation import InLoopMetrics

            self.metrics = InLoopMetrics(self.cfg, self.device, cache_dir=self.run.cache,
                                         class_counts=list(state.classes.values()))
            self.write(step, state.images_seen, self.metrics.floors)
            if self.is_main:
                log.info("real floors (train vs held-out; halves of train): %s",
                         "  ".join(f"{k} {v:.4g}" for k, v in self.metrics.floors.items()))
        if self.is_main and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True)

    def write(self, step: int, images_seen: int, values: dict[str, float]) -> None:
        """One record: to the metrics log, and to MLflow with `images_seen` beside it (a chart's x-axis)."""
        if self.is_main:
            self.run.append_metrics({"step": step, "images_seen": images_seen, "time": time.time(), **values})
            if self.tracker:
                self.tracker.log_metrics({**values, "images_seen": images_seen}, step)

    def log_step(self, step: int, total: int, images_seen: int, record: dict[str, float]) -> None:
        self.write(step, images_seen, record)
        if self.is_main and self._bar is None:
            log.info("step %d/%d  loss_d %.4f  loss_g %.4f  D(x) %.3f  D(G(z)) %.3f  %.1f img/s", step, total,
                     record["loss_d"], record["loss_g"], record["d_real"], record["d_fake"], record["images_per_s"])

    def tick(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def samples(self, generator: torch.nn.Module, step: int) -> None:
        if self.is_main:
            path = save_grid(generate(generator, self.fixed_noise, self.fixed_labels), self.run.sample_grid(step))
            if self.tracker:
                self.tracker.log_artifact(path, "samples")

    def evaluate(self, generator: torch.nn.Module, step: int, images_seen: int) -> dict[str, float]:
        """In-loop metrics, logged with `eval_s`, their cost in seconds (kept well below the training time)."""
        from hpcgan.train.evaluation import with_floors

        start = time.perf_counter()
        values = self.metrics(generator)
        seconds = self.eval_s = time.perf_counter() - start
        self.write(step, images_seen, {**{f"eval/{k}": v for k, v in values.items()}, "eval_s": seconds})
        if self.is_main:
            log.info("eval step %d (%.1f s): %s", step, seconds, with_floors(values, self.metrics.floors))
        return values

    def finish(self, status: str, generator: torch.nn.Module | None = None) -> None:
        """Close the bar and the MLflow run (logging `generator` as its model when finished)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if status == "FINISHED" and self.is_main and self.cfg.track.report:
            self._write_report()
        if self.tracker:
            if generator is not None and self.cfg.track.log_model:
                self.tracker.log_generator(generator, self.cfg.model.nz)
            self.tracker.close(status=status)

    def _write_report(self) -> None:
        """The run's HTML report, into the run folder and MLflow; a failure costs a warning, not the run."""
        from hpcgan.report import write_report

        try:
            path = write_report(self.run.root)
        except Exception as err:  # noqa: BLE001 - the report is a view of finished work, never a reason to fail
            log.warning("run report not written (%s: %s)", type(err).__name__, err)
            return
        log.info("run report %s", path)
        if self.tracker:
            self.tracker.log_artifact(path, "report")


def start_tracking(cfg: Config, run: RunFolder, run_id: str | None, precision: str) -> Any:
    """The MLflow run of this run folder: the checkpoint's or tracking file's run id, else a new one."""
    from hpcgan.config import flatten
    from hpcgan.track import Tracker, run_tags  # MLflow import costs seconds; only rank 0 pays

    if run_id is None:
        run_id = (run.read_tracking() or {}).get("run_id")
    tcfg = cfg.track
    tracker = Tracker(uri=tcfg.uri, experiment=tcfg.experiment, run_name=tcfg.run_name or run.root.name,
                      params=flatten(cfg), tags={**run_tags(), "precision": precision}, run_id=run_id,
                      flush_every_s=tcfg.flush_every_s, system_metrics_every_s=tcfg.system_metrics_every_s)
    if tracker.run_id:
        run.write_tracking(tracker.run_id, tracker.uri, tcfg.experiment)
        log.info("MLflow run %s at %s", tracker.run_id, tracker.uri)
    return tracker
