"""What a run reports as it trains: step statistics summed on the device, turned into one record per
log interval (the loop's only host sync), written to the run folder's metrics log and to MLflow."""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hpcgan.config import Config, ConfigError
from hpcgan.train.deadline import format_count, job_end_time, job_left, progress_line, run_eta
from hpcgan.train.run_folder import RunFolder, os_error_line
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
        self._state: TrainState | None = None
        self.eval_s: float | None = None  # what the last in-loop evaluation cost
        self.fixed_noise = torch.randn(64, cfg.model.nz, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
        classes = cfg.model.num_classes  # a conditional grid shows every class, one per row
        self.fixed_labels = grid_labels(64, classes).to(device) if classes else None
        self._bar: Any = None
        self._job_end: float | None = None
        self._node_monitor: Any = None

    def start(self, state: TrainState, precision: str, total: int) -> None:
        """Open tracking (continuing the state's MLflow run), in-loop metrics and the progress bar."""
        step = state.step
        self._state = state
        leads_node, nodes = node_role() if self.cfg.track.enabled and self.cfg.track.system_metrics_every_s > 0 \
            else (self.is_main, 1)
        node_id = socket.gethostname() if nodes > 1 else None  # one `system/<host>/` family per node
        if self.is_main:
            self._job_end = job_end_time()
        if self.is_main and self.cfg.track.enabled:
            self.tracker = start_tracking(self.cfg, self.run, state.mlflow_run_id, precision, node_id)
            state.mlflow_run_id = self.tracker.run_id
        if nodes > 1:
            run = (state.mlflow_run_id, self.tracker.uri) if self.tracker else (None, None)
            self._node_monitor = node_system_metrics(run, leads_node and not self.is_main,
                                                     self.cfg.track.system_metrics_every_s, node_id)
        if state.restarts:
            self.write(step, state.images_seen, {"restarts": state.restarts})
        if self.cfg.metrics.every > 0:  # a run shorter than metrics.every still evaluates its last step
            from hpcgan.train.evaluation import InLoopMetrics

            self.metrics = InLoopMetrics(self.cfg, self.device, cache_dir=self.run.cache,
                                         class_counts=list(state.classes.values()), is_main=self.is_main)
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
                self._state.mlflow_run_id = self.tracker.run_id  # known late when the server came up late

    def log_step(self, step: int, total: int, images_seen: int, record: dict[str, float]) -> None:
        self.write(step, images_seen, record)
        if not self.is_main:
            return
        line = progress_line(step, total, images_seen, record, self.cfg.train.batch_size, self._job_end)
        if self._bar is None:
            log.info("%s", line)
        else:  # the bar shows steps and its own ETA; images seen and the job's time left go beside it
            eta = run_eta(step, total, self.cfg.train.batch_size, record["images_per_s"])
            self._bar.set_postfix_str("  ".join(p for p in (f"{format_count(images_seen)} img",
                                                             job_left(self._job_end, eta)) if p), refresh=False)

    def tag(self, key: str, value: str) -> None:
        """An MLflow tag on the run (rank 0)."""
        if self.tracker:
            self.tracker.set_tag(key, value)

    def tick(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def samples(self, generator: torch.nn.Module, step: int) -> None:
        """A sample grid; one that cannot be written costs a warning, not the run (checkpoints are the work)."""
        if self.is_main:
            try:
                path = save_grid(generate(generator, self.fixed_noise, self.fixed_labels),
                                 self.run.sample_grid(step))
            except OSError as err:
                log.warning("sample grid of step %d not written: %s", step, os_error_line(err))
                return
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
        """Close the bar and the MLflow run (logging `generator` as its model when finished). "KILLED" here
        is an interrupt with a resumable exit: MLflow shows KILLED, the status tag requeue-pending."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if status == "FINISHED" and self.is_main and self.cfg.track.report:
            self._write_report()
        if self._node_monitor is not None:
            self._node_monitor.finish()
            self._node_monitor = None
        if self.tracker:
            if generator is not None and self.cfg.track.log_model:
                self.tracker.log_generator(generator, self.cfg.model.nz)
            self._close(status, requeue=status == "KILLED")

    def fail(self, err: BaseException) -> None:
        """End the MLflow run of a trainer that raised: FAILED with the reason, or KILLED by Ctrl-C."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if not self.tracker:
            return
        if isinstance(err, KeyboardInterrupt):
            self._close("KILLED")
        else:
            reason = str(err).strip().splitlines()[0][:500] if str(err).strip() else ""
            self._close("FAILED", failure=f"{type(err).__name__}: {reason}".rstrip(": "))

    def _close(self, status: str, **how: Any) -> None:
        tracker, self.tracker = self.tracker, None  # closed once, whatever raises later
        tracker.close(status=status, **how)

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


def node_role() -> tuple[bool, int]:
    """(whether this rank is the first on its host, how many hosts the job spans); a collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True, 1
    host = socket.gethostname()
    hosts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, host)
    return hosts.index(host) == dist.get_rank(), len(set(hosts))


def node_system_metrics(run: tuple[str | None, str | None], leads_node: bool, every_s: float,
                        node_id: str | None) -> Any:
    """Every rank learns rank 0's MLflow (run id, URI) (a collective); the first rank of each other node
    samples its node's CPU, memory, disk, network and (with pynvml) GPUs into that run as `system/<node_id>/*`."""
    shared = [run]
    dist.broadcast_object_list(shared, src=0)
    run_id, uri = shared[0]
    if not leads_node or run_id is None:
        return None
    from hpcgan.track.tracker import start_system_metrics

    return start_system_metrics(run_id, uri, every_s, node_id)


def start_tracking(cfg: Config, run: RunFolder, run_id: str | None, precision: str,
                   node_id: str | None = None) -> Any:
    """The MLflow run of this run folder: the checkpoint's or tracking file's run id, else a new one."""
    from hpcgan.config import flatten, resolve_tracking_uri
    from hpcgan.track import Tracker, run_tags  # MLflow import costs seconds; only rank 0 pays

    tcfg = cfg.track
    uri = resolve_tracking_uri(tcfg.uri)
    check_store(uri)
    run_id = (run.read_tracking() or {}).get("run_id") or run_id

    def recorded(new_id: str) -> None:
        run.write_tracking(new_id, uri, tcfg.experiment)
        log.info("MLflow run %s at %s", new_id, uri)

    tracker = Tracker(uri=uri, experiment=tcfg.experiment, run_name=tcfg.run_name or run.root.name,
                      params=flatten(cfg), tags={**run_tags(), "precision": precision}, run_id=run_id,
                      flush_every_s=tcfg.flush_every_s, system_metrics_every_s=tcfg.system_metrics_every_s,
                      system_node_id=node_id, on_run=recorded)
    if run_id:
        recorded(run_id)
    return tracker


def check_store(uri: str) -> None:
    """A local SQLite store needs a writable folder; say so before training, not as a traceback later."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    folder = db.parent
    why = ("is a folder" if db.is_dir() else "its folder does not exist" if not folder.is_dir()
           else "its folder is not writable" if not os.access(folder, os.W_OK)
           else "is not writable" if db.exists() and not os.access(db, os.W_OK) else None)
    if why:
        raise ConfigError(f"track.uri {uri}: {db} {why}; create it or point track.uri (or $MLFLOW_TRACKING_URI) "
                          "at a writable store, or set track.enabled=false")
