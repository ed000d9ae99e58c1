"""The training loop: DCGAN steps under Accelerate, EMA, logging, checkpoints and interruption.

The loop knows nothing of SLURM: it sees a run folder, a world size (from the environment Accelerate
reads) and signals. Everything needed to continue lives in the run folder, and a resumed run produces
bit-identical weights to an uninterrupted one on CPU.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs

from hpcgan.config import Config, ConfigError, flatten, save_config, to_dict
from hpcgan.data import BatchSource, build_source
from hpcgan.models import build_models
from hpcgan.models.losses import d_loss, g_loss
from hpcgan.train.checkpoint import CheckpointError, CheckpointManager, load_torch, step_dir_name
from hpcgan.train.precision import mixed_precision_here, precision_name
from hpcgan.train.samples import generate, save_grid
from hpcgan.train.signals import EXIT_INTERRUPTED, InterruptFlag
from hpcgan.train.state import TrainState, capture_rng, restore_rng, seed_everything

log = logging.getLogger(__name__)

STAT_NAMES = ("loss_d", "loss_g", "d_real", "d_fake", "d_fake_g")
EXIT_DONE = 0


class StepAborted(Exception):
    """An interrupt arrived before the step changed any weights; the step has been undone but for the
    data reader, which stays ahead (rewinding DALI or webdataset workers costs seconds): `data` is its
    position at the step's start, the one to save."""

    data: dict[str, Any]


@dataclass
class RunFiles:
    """Paths inside one run folder, the unit of truth for a run."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def metrics_log(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tracking(self) -> Path:
        return self.root / "tracking.json"

    @property
    def best(self) -> Path:
        return self.root / "best"


class EMA:
    """Exponential moving average of G's weights (BatchNorm buffers copied), used for samples."""

    def __init__(self, generator: torch.nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(generator).eval().requires_grad_(False)
        self.decay = decay
        self._src_params = list(generator.parameters())
        self._src_buffers = list(generator.buffers())
        self._params = list(self.module.parameters())
        self._buffers = list(self.module.buffers())

    @torch.no_grad()
    def update(self, step: int) -> None:
        # Ramp the decay up so early, noisy weights fade quickly.
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self._params, self._src_params, 1.0 - decay)
        torch._foreach_copy_(self._buffers, self._src_buffers)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.files = RunFiles(Path(run_dir))
        tcfg = cfg.train
        handlers = [DistributedDataParallelKwargs(broadcast_buffers=False)]
        # broadcast_buffers=False: D runs on the real and the fake batch before one backward; buffer
        # broadcasts at the second forward would modify BatchNorm stats that autograd saved. Each rank
        # keeps its own running stats (unused by D in train mode); rank 0's go into checkpoints.
        # Newer torch renames the flag (forward_sync_buffers) but keeps this one's exact meaning.
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        # Accelerate keeps mixed precision in a process-wide singleton; each Trainer sets its own
        # (the distributed state is kept), so fp32 and bf16 trainers can live in one process.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.precision = mixed_precision_here(tcfg.mixed_precision)
        self.acc = Accelerator(mixed_precision=self.precision, cpu=not torch.cuda.is_available(),
                               kwargs_handlers=handlers)
        if self.precision == "fp16" and self.acc.scaler is None:
            raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU (its loss scaler); "
                              "on CPU use train.mixed_precision=bf16")
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.is_main = self.acc.is_main_process  # global rank 0, not the node-local one
        self.device = self.acc.device
        if tcfg.batch_size % self.world:
            raise ConfigError(f"train.batch_size={tcfg.batch_size} must be divisible by the {self.world} processes")

        seed_everything(cfg.seed)  # identical initial weights on every rank
        generator, discriminator = build_models(cfg.model)
        if tcfg.sync_batchnorm and self.world > 1:
            generator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(generator)
            discriminator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
        self.ema = EMA(generator, tcfg.ema_decay) if tcfg.ema else None
        self.source: BatchSource = build_source(cfg.data, seed=cfg.seed, global_batch=tcfg.batch_size,
                                                rank=self.rank, world=self.world, device=self.device,
                                                resolution=cfg.model.resolution)
        if self.source.image_shape != (cfg.model.channels, cfg.model.resolution, cfg.model.resolution):
            c, h, w = self.source.image_shape
            raise ConfigError(f"data {cfg.data.path} holds {c}x{h}x{w} images but the model makes "
                              f"{cfg.model.channels}x{cfg.model.resolution}x{cfg.model.resolution}: set "
                              f"model.resolution={h} or prepare the data at --size {cfg.model.resolution}")
        self.total_steps = tcfg.steps if tcfg.steps is not None else tcfg.epochs * self.source.batches_per_epoch

        opt_kwargs = dict(lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2))
        if tcfg.fused_adam:
            opt_kwargs["fused"] = True
        opt_g = torch.optim.Adam(generator.parameters(), **opt_kwargs)
        opt_d = torch.optim.Adam(discriminator.parameters(), **opt_kwargs)
        if tcfg.channels_last:
            generator, discriminator = (m.to(memory_format=torch.channels_last) for m in (generator, discriminator))
        # The plain modules: what checkpoints, EMA and samples use, whatever wraps them for training.
        self.generator, self.discriminator = generator, discriminator
        self.G, self.D, self.opt_g, self.opt_d = self.acc.prepare(generator, discriminator, opt_g, opt_d)
        if self.ema:
            self.ema.module.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if tcfg.compile:
            self.G = torch.compile(self.G, mode=tcfg.compile_mode)
            self.D = torch.compile(self.D, mode=tcfg.compile_mode)

        self.state = TrainState(world_size=self.world)
        self.ckpt = CheckpointManager(self.files.checkpoints, keep=cfg.checkpoint.keep,
                                      milestones=cfg.checkpoint.milestones, rank=self.rank,
                                      barrier=self.acc.wait_for_everyone)
        self.interrupt = InterruptFlag()
        # One CPU process runs a step synchronously for seconds; an interrupt that arrives before D's
        # update undoes the step and saves at once rather than finishing it, halving the worst-case
        # signal-to-exit time. On a GPU the host is ahead of the device anyway, and several ranks would
        # have to agree mid-step.
        self._abortable = self.device.type == "cpu" and self.world == 1
        self._buffers = [*generator.buffers(), *discriminator.buffers()]
        self._saved_step = -1
        self.tracker = None
        self.metrics = None
        fixed = torch.Generator().manual_seed(cfg.seed)
        self.fixed_noise = torch.randn(64, cfg.model.nz, generator=fixed).to(self.device)

    # ------------------------------------------------------------------ resume
    def _restore(self, folder: Path) -> None:
        saved_cfg = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").exists() else {}
        if saved_cfg.get("model") and saved_cfg["model"] != to_dict(self.cfg.model):
            diff = {k: (v, saved_cfg["model"].get(k)) for k, v in to_dict(self.cfg.model).items()
                    if saved_cfg["model"].get(k) != v}
            key, (now, then) = next(iter(diff.items()))
            raise ConfigError(f"model.{key}={now} but checkpoint {folder} was trained with {then}: "
                              f"use the same model settings or a new --out folder")
        weights = load_torch(folder / "model.pt")
        optim = load_torch(folder / "optim.pt")
        try:
            self.generator.load_state_dict(weights["G"])
            self.discriminator.load_state_dict(weights["D"])
            if self.ema:
                self.ema.module.load_state_dict(weights.get("G_ema", weights["G"]))
            self.opt_g.load_state_dict(optim["G"])
            self.opt_d.load_state_dict(optim["D"])
        except (KeyError, RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0][:200]
            raise CheckpointError(f"{folder} does not match this model ({first}); "
                                  "it is foreign or from other settings: use a new --out folder") from None
        if self.acc.scaler is not None and optim.get("scaler"):
            self.acc.scaler.load_state_dict(optim["scaler"])
        self.state = TrainState.from_dict(self.ckpt.read_state(folder))
        mine = self.ckpt.read_rank_state(folder)
        if mine is None:
            log.warning("%s holds no state for rank %d (saved with %d processes, now %d): "
                        "continuing with fresh noise, not an exact continuation",
                        folder, self.rank, self.state.world_size, self.world)
            self.source.load_state_dict(self.state.data)
            seed_everything(self.cfg.seed + 7919 * self.rank + self.state.step)
        else:
            self.source.load_state_dict(mine["data"])
            restore_rng(mine["rng"])
        self.state.restarts += 1
        self.state.world_size = self.world
        self._saved_step = self.state.step

    # ------------------------------------------------------------------ step
    def step(self) -> torch.Tensor:
        """Take the next batch, update D then G, advance the counters; returns device-side statistics.

        Raises StepAborted, with weights, BatchNorm statistics and RNG back at the previous step boundary,
        when an interrupt arrives before D's update on an abortable (single CPU process) trainer.
        """
        if not self._abortable:
            stats = self._train_step(self.source.next_batch())
        else:
            data, rng, buffers = self.source.state_dict(), capture_rng(), [b.clone() for b in self._buffers]
            try:
                stats = self._train_step(self.source.next_batch())
            except StepAborted as aborted:
                restore_rng(rng)
                with torch.no_grad():
                    torch._foreach_copy_(self._buffers, buffers)
                self.opt_d.zero_grad(set_to_none=True)
                aborted.data = data
                raise
        self.state.step += 1
        self.state.images_seen += self.cfg.train.batch_size
        return stats

    def _train_step(self, real: torch.Tensor) -> torch.Tensor:
        if self.cfg.train.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        z = torch.randn(real.shape[0], self.cfg.model.nz, device=self.device)
        self.opt_d.zero_grad(set_to_none=True)
        fake = self.G(z)
        self._abort_point()
        real_logits = self.D(real)
        fake_logits = self.D(fake.detach())
        self._abort_point()
        loss_d = d_loss(real_logits, fake_logits)
        self.acc.backward(loss_d)
        self._abort_point()  # the last one: from D's update on, the step runs to its end
        self.opt_d.step()

        self.opt_g.zero_grad(set_to_none=True)
        # D's weight gradients from the G step would be discarded: neither computed (a third of D's
        # backward) nor all-reduced. Only the gradient w.r.t. D's input flows back into G.
        self.discriminator.requires_grad_(False)
        try:
            with self.acc.no_sync(self.D):
                fake_logits_g = self.D(fake)
                loss_g = g_loss(fake_logits_g)
                self.acc.backward(loss_g)
        finally:
            self.discriminator.requires_grad_(True)
        self.opt_g.step()
        if self.ema:
            self.ema.update(self.state.step)
        with torch.no_grad():
            return torch.stack([loss_d.detach(), loss_g.detach(), torch.sigmoid(real_logits.float()).mean(),
                                torch.sigmoid(fake_logits.float()).mean(),
                                torch.sigmoid(fake_logits_g.float()).mean()])

    def _abort_point(self) -> None:
        if self._abortable and self.interrupt:
            raise StepAborted

    # ------------------------------------------------------------------ side effects
    def _should_stop(self) -> bool:
        """All ranks agree on an interrupt; across ranks only every `sync_every` steps (a host sync)."""
        if self.world == 1:
            return bool(self.interrupt)
        if self.state.step % self.cfg.train.sync_every:
            return False
        flag = torch.tensor([1.0 if self.interrupt else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def save_checkpoint(self, data: dict[str, Any] | None = None) -> Path:
        """Commit the current step; `data`: the reader's position when it is not the reader's own."""
        if self._saved_step == self.state.step:
            return self.ckpt.root / step_dir_name(self.state.step)
        self._saved_step = self.state.step
        self.state.data = data if data is not None else self.source.state_dict()
        shared = {}
        if self.is_main:
            shared = {
                "model.pt": {"G": self.generator.state_dict(),
                             "D": self.discriminator.state_dict(),
                             "G_ema": self.ema.module.state_dict() if self.ema else None},
                "optim.pt": {"G": self.opt_g.state_dict(), "D": self.opt_d.state_dict(),
                             "scaler": self.acc.scaler.state_dict() if self.acc.scaler else None},
                "state.json": json.dumps(self.state.to_dict(), indent=1),
                "config.yaml": yaml.safe_dump(to_dict(self.cfg), sort_keys=False),
            }
        path = self.ckpt.save(self.state.step, shared, {"rng": capture_rng(), "data": self.state.data})
        if self.is_main:
            log.info("checkpoint %s", path)
        return path

    def _sample_generator(self) -> torch.nn.Module:
        return self.ema.module if self.ema else self.generator

    def _write_samples(self) -> None:
        if not self.is_main:
            return
        images = generate(self._sample_generator(), self.fixed_noise)
        path = save_grid(images, self.files.samples / f"step-{self.state.step:07d}.png")
        if self.tracker:
            self.tracker.log_artifact(path, "samples")

    def _start_tracking(self) -> None:
        if not (self.is_main and self.cfg.track.enabled):
            return
        from hpcgan.track import Tracker, run_tags  # MLflow import costs seconds; only rank 0 pays

        run_id = self.state.mlflow_run_id
        if run_id is None and self.files.tracking.exists():
            run_id = json.loads(self.files.tracking.read_text()).get("run_id")
        tcfg = self.cfg.track
        tags = {**run_tags(), "precision": precision_name(self.precision)}
        self.tracker = Tracker(uri=tcfg.uri, experiment=tcfg.experiment, run_name=tcfg.run_name or self.files.root.name,
                               params=flatten(self.cfg), tags=tags, run_id=run_id,
                               flush_every_s=tcfg.flush_every_s)
        self.state.mlflow_run_id = self.tracker.run_id
        if self.tracker.run_id:
            _atomic_write(self.files.tracking, json.dumps(
                {"run_id": self.tracker.run_id, "tracking_uri": self.tracker.uri, "experiment": tcfg.experiment}))
            log.info("MLflow run %s at %s", self.tracker.run_id, self.tracker.uri)

    def _evaluate(self) -> None:
        """In-loop metrics on EMA samples; a new best (lower `metrics.best`) is checkpointed and copied to best/."""
        values = self.metrics(self._sample_generator())
        if self.is_main:
            self._log({f"eval/{k}": v for k, v in values.items()})
        key = self.cfg.metrics.best
        value = values.get(key)
        if value is None or (self.state.best and value >= self.state.best["value"]):
            return
        self.state.best = {"metric": key, "value": value, "step": self.state.step}
        folder = self.save_checkpoint()
        if self.is_main:
            staging, old = self.files.root / ".best-tmp", self.files.root / ".best-old"
            for leftover in (staging, old):
                shutil.rmtree(leftover, ignore_errors=True)
            shutil.copytree(folder, staging)
            if self.files.best.exists():
                self.files.best.rename(old)
            staging.rename(self.files.best)
            shutil.rmtree(old, ignore_errors=True)
            log.info("new best %s=%.4f at step %d -> %s", key, value, self.state.step, self.files.best)

    def _log(self, stats: dict[str, float]) -> None:
        record = {"step": self.state.step, "images_seen": self.state.images_seen, **stats}
        with open(self.files.metrics_log, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tracker:
            self.tracker.log_metrics(stats, self.state.step)

    # ------------------------------------------------------------------ run
    def fit(self) -> int:
        """Train to `total_steps`; returns 0 when done, EXIT_INTERRUPTED after a signal-triggered save."""
        latest = self.ckpt.latest()
        if latest is not None:
            self._restore(latest)
            if self.is_main:
                log.info("resumed from %s (step %d of %d)", latest, self.state.step, self.total_steps)
        if self.state.step >= self.total_steps:
            if self.is_main:
                log.info("run %s is already at step %d of %d: nothing to do", self.files.root,
                         self.state.step, self.total_steps)
            return EXIT_DONE
        if self.is_main:
            self.files.root.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.files.config)
            log.info("training on %s x %d in %s (train.mixed_precision=%s)", self.device.type, self.world,
                     precision_name(self.precision), self.cfg.train.mixed_precision)
        self._start_tracking()
        if self.tracker and self.state.restarts:
            self.tracker.log_metrics({"restarts": self.state.restarts}, self.state.step)
        if self.cfg.metrics.every:
            from hpcgan.train.evaluation import InLoopMetrics

            self.metrics = InLoopMetrics(self.cfg, self.device, cache_dir=self.files.root / "cache")
        self.interrupt.install()
        try:
            return self._loop()
        finally:
            self.interrupt.restore()

    def _loop(self) -> int:
        tcfg, ccfg = self.cfg.train, self.cfg.checkpoint
        stats_sum = torch.zeros(len(STAT_NAMES), device=self.device)
        n_stats, last_time, last_images = 0, time.perf_counter(), self.state.images_seen
        progress = None
        if self.is_main and sys.stderr.isatty():
            from tqdm import tqdm
            progress = tqdm(total=self.total_steps, initial=self.state.step, unit="step", dynamic_ncols=True)
        milestones = set(ccfg.milestones)
        compiling = tcfg.compile
        while self.state.step < self.total_steps:
            try:
                stats_sum += self.step()
            except StepAborted as aborted:
                return self._exit_interrupted(progress, data=aborted.data)
            n_stats += 1
            step = self.state.step
            if compiling:  # reported on its own, and kept out of images/s
                stats_sum.cpu()  # wait for the compiled kernels to finish
                compile_s = time.perf_counter() - last_time
                compiling, last_time, last_images = False, time.perf_counter(), self.state.images_seen
                if self.is_main:
                    log.info("torch.compile (%s) + first step: %.1f s", tcfg.compile_mode, compile_s)
                    if self.tracker:
                        self.tracker.log_metrics({"compile_s": compile_s}, step)
            if step % tcfg.log_every == 0 or step == self.total_steps:
                values = (stats_sum / n_stats).tolist()  # the only host sync, once per log interval
                now = time.perf_counter()
                stats = dict(zip(STAT_NAMES, values))
                stats["images_per_s"] = (self.state.images_seen - last_images) / max(now - last_time, 1e-9)
                stats["epoch"] = self.state.images_seen / self.source.num_images
                stats_sum.zero_()
                n_stats, last_time, last_images = 0, now, self.state.images_seen
                if self.is_main:
                    self._log(stats)
                    if progress is None:
                        log.info("step %d/%d  loss_d %.4f  loss_g %.4f  D(x) %.3f  D(G(z)) %.3f  %.1f img/s",
                                 step, self.total_steps, stats["loss_d"], stats["loss_g"], stats["d_real"],
                                 stats["d_fake"], stats["images_per_s"])
            if progress is not None:
                progress.update(1)
            if step % tcfg.sample_every == 0:
                self._write_samples()
            if self.metrics and step % self.cfg.metrics.every == 0:
                self._evaluate()
            if step % ccfg.every == 0 or step in milestones:
                self.save_checkpoint()
            if step < self.total_steps and self._should_stop():
                return self._exit_interrupted(progress)
        if progress is not None:
            progress.close()
        self.save_checkpoint()
        if self.state.step % tcfg.sample_every:
            self._write_samples()
        if self.tracker:
            if self.cfg.track.log_model:
                self.tracker.log_generator(self._sample_generator(), self.cfg.model.nz)
            self.tracker.close(status="FINISHED")
        if self.is_main:
            log.info("done: step %d, run folder %s", self.state.step, self.files.root)
        return EXIT_DONE

    def _exit_interrupted(self, progress: Any, data: dict[str, Any] | None = None) -> int:
        """Save and report; with `data` (an aborted step's start) the trainer is left for exit only."""
        if progress is not None:
            progress.close()
        self.save_checkpoint(data)
        if self.is_main:
            log.warning("interrupted by signal %s %s step %d: checkpoint saved, exiting with %d (resumable)",
                        self.interrupt.signum, "during the step after" if data is not None else "at",
                        self.state.step, EXIT_INTERRUPTED)
        if self.tracker:
            self.tracker.close(status="KILLED")
        return EXIT_INTERRUPTED


def release_distributed() -> None:
    """Destroy the process group before exit: an undestroyed gloo group can abort the process."""
    if dist.is_initialized():
        dist.destroy_process_group()


def train(cfg: Config, run_dir: str | Path) -> int:
    try:
        return Trainer(cfg, run_dir).fit()
    finally:
        release_distributed()
