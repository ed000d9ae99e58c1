"""The training loop: GAN steps under Accelerate, with checkpoints, logging and interruption.

The loop knows nothing of SLURM: it sees a run folder, a world size (from the environment Accelerate
reads) and signals. It knows G, D, the augmentation and the EMA only through small interfaces; every
stateful part is registered once with the checkpoint manager, so a resumed run produces bit-identical
weights to an uninterrupted one on CPU.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hpcgan.config import Config
from hpcgan.data import Reader, build_reader
from hpcgan.models import build_models
from hpcgan.augment import build_augment
from hpcgan.models.ema import EMA, ema_decay
from hpcgan.models.losses import d_loss, g_loss, r1_penalty
from hpcgan.train.checkpoint import MODEL_FILE, STATE_FILE, CheckpointError, CheckpointManager, step_dir_name
from hpcgan.train.conditioning import check_classes, resolve_classes, run_classes, step_labels
from hpcgan.train.distributed import agree, release_distributed, resume_on_new_world
from hpcgan.train.precision import precision_name
from hpcgan.train.progress import Reporter, StepStats
from hpcgan.train.run_folder import CONFIG_FILE, RunFolder, RunLock, RunLockedError
from hpcgan.train.signals import EXIT_INTERRUPTED, InterruptFlag, StepAborted, StepSnapshot
from hpcgan.train.setup import make_accelerator, prepare
from hpcgan.train.state import GlobalRNG, SavedConfig, TrainState, rank_seed, seed_everything

log = logging.getLogger(__name__)

EXIT_DONE = 0


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, interrupt: InterruptFlag | None = None) -> None:
        """`interrupt`: a flag installed before the trainer is built, so that a signal during start-up
        (data, models, floors, MLflow, resume) still ends in a resumable exit; fit() installs its own."""
        self.interrupt = interrupt if interrupt is not None else InterruptFlag()
        self.cfg, tcfg = cfg, cfg.train
        self.run = RunFolder(run_dir)
        self.acc, self.precision = make_accelerator(cfg)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.is_main = self.acc.is_main_process  # global rank 0, not the node-local one
        self.device = self.acc.device
        self.reader: Reader = build_reader(cfg.data, seed=cfg.seed, global_batch=tcfg.batch_size, rank=self.rank,
                                           world=self.world, device=self.device, resolution=cfg.model.resolution)
        self.cfg = cfg = resolve_classes(cfg, self.reader.classes)  # the number of classes is saved with it
        seed_everything(cfg.seed)  # identical initial weights on every rank
        generator, discriminator = build_models(cfg.model)
        if tcfg.sync_batchnorm and self.world > 1:
            generator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(generator)
            discriminator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
        self.total_steps = tcfg.steps if tcfg.steps is not None else tcfg.epochs * self.reader.batches_per_epoch
        self.augment = build_augment(cfg.augment, seed=cfg.seed, rank=self.rank, device=self.device)
        # The plain modules: what checkpoints, EMA and samples use, whatever wraps them for training.
        self.generator, self.discriminator = generator, discriminator
        self.G, self.D, self.opt_g, self.opt_d = prepare(self.acc, cfg, generator, discriminator)
        self.ema = EMA(generator, ema_decay(tcfg.ema_decay, tcfg.ema_half_life_images, tcfg.batch_size)) \
            if tcfg.ema else None
        seed_everything(rank_seed(cfg.seed, self.rank))
        self.state = TrainState(world_size=self.world, classes=run_classes(cfg, self.reader.classes))
        self.ckpt = CheckpointManager(self.run.checkpoints, keep=cfg.checkpoint.keep, best=self.run.best,
                                      milestones=cfg.checkpoint.milestones, rank=self.rank, agree=self._agree)
        self._register_parts()
        # One CPU process runs a step synchronously for seconds; an interrupt that arrives before D's
        # update undoes the step and saves at once rather than finishing it, halving the worst-case
        # signal-to-exit time. On a GPU the host is ahead of the device anyway, and several ranks would
        # have to agree mid-step.
        self._abortable = self.device.type == "cpu" and self.world == 1
        self._buffers = [*generator.buffers(), *discriminator.buffers()]
        self._saved_step = -1
        self.report = Reporter(cfg, self.run, self.device, self.is_main)

    def _register_parts(self) -> None:
        """Everything a resumed run needs, each part once; the manager loads them in this order."""
        ckpt = self.ckpt
        ckpt.register("config", SavedConfig(self.cfg), file=CONFIG_FILE, optional=True)
        ckpt.register("G", self.generator, file=MODEL_FILE)
        ckpt.register("D", self.discriminator, file=MODEL_FILE)
        if self.ema:
            ckpt.register("G_ema", self.ema, file=MODEL_FILE)
        ckpt.register("G", self.opt_g, file="optim.pt")
        ckpt.register("D", self.opt_d, file="optim.pt")
        if self.acc.scaler is not None:
            ckpt.register("scaler", self.acc.scaler, file="optim.pt", optional=True)
        ckpt.register("state", self.state, file=STATE_FILE)
        ckpt.register_rank("rng", GlobalRNG())
        if self.augment is not None:  # per rank: each rank's augmentation stream is its own
            ckpt.register_rank("augment", self.augment)
        ckpt.register_rank("data", self.reader)

    def _agree(self, ok: bool) -> bool:
        return agree(ok, self.world, self.device)

    # ------------------------------------------------------------------ resume
    def _restore(self, folder: Path) -> None:
        """Load `folder`; one written by another number of processes continues in global terms."""
        classes = self.state.classes
        if not self.ckpt.load(folder) or self.state.world_size != self.world:
            change = resume_on_new_world(folder, self.state, seed=self.cfg.seed, rank=self.rank, world=self.world,
                                         global_batch=self.cfg.train.batch_size, reader=self.reader,
                                         augment=self.augment)
            if self.is_main:
                log.info("%s", change)
        check_classes(self.state.classes, classes, self.cfg.data.path)
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
            real, labels = self.reader.next_batch()
            stats = self._train_step(real, labels)
        else:
            before = StepSnapshot(self.reader, self._buffers, self.augment)
            try:
                real, labels = self.reader.next_batch()
                stats = self._train_step(real, labels)
            except StepAborted as aborted:
                before.restore()
                self.opt_d.zero_grad(set_to_none=True)
                aborted.data = before.data
                raise
        self.state.step += 1
        self.state.images_seen += self.cfg.train.batch_size
        if self.augment is not None:
            self.augment.adjust(self.state.step, self.cfg.train.batch_size)
        return stats

    def _see(self, images: torch.Tensor) -> torch.Tensor:
        """What D is shown: every image, real or fake, goes through the same augmentation."""
        return self.augment(images) if self.augment is not None else images

    def _train_step(self, real: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        tcfg = self.cfg.train
        if tcfg.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        z = torch.randn(real.shape[0], self.cfg.model.nz, device=self.device)
        labels, fake_y = step_labels(labels, self.cfg.model.num_classes, tcfg.class_balance)
        self.opt_d.zero_grad(set_to_none=True)
        fake = self.G(z, fake_y)
        self._abort_point()
        do_r1 = tcfg.r1_gamma > 0 and self.state.step % tcfg.r1_every == 0
        real = real.detach().requires_grad_(do_r1)
        real_logits = self.D(self._see(real), labels)
        fake_logits = self.D(self._see(fake.detach()), fake_y)
        self._abort_point()
        loss_d = d_loss(real_logits, fake_logits, tcfg.loss)
        if do_r1:
            scale = self.acc.scaler.get_scale() if self.acc.scaler is not None else 1.0
            loss_d = loss_d + r1_penalty(real_logits, real, scale) * (tcfg.r1_gamma / 2 * tcfg.r1_every)
        self.acc.backward(loss_d)
        self._abort_point()  # the last one: from D's update on, the step runs to its end
        self.opt_d.step()
        if self.augment is not None:
            self.augment.observe(real_logits.detach())

        self.opt_g.zero_grad(set_to_none=True)
        # D's weight gradients from the G step would be discarded: neither computed (a third of D's
        # backward) nor all-reduced. Only the gradient w.r.t. D's input flows back into G.
        self.discriminator.requires_grad_(False)
        try:
            with self.acc.no_sync(self.D):
                fake_logits_g = self.D(self._see(fake), fake_y)
                loss_g = g_loss(fake_logits_g, tcfg.loss)
                self.acc.backward(loss_g)
        finally:
            self.discriminator.requires_grad_(True)
        self.opt_g.step()
        if self.ema:
            self.ema.update(self.state.step)
        with torch.no_grad():
            return torch.stack([loss_d.detach(), loss_g.detach(),
                                torch.sigmoid(real_logits.float()).mean(), torch.sigmoid(fake_logits.float()).mean(),
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
        return not self._agree(not self.interrupt)

    def save_checkpoint(self, data: dict[str, Any] | None = None) -> Path:
        """Commit the current step; `data`: the reader's position when it is not the reader's own."""
        if self._saved_step == self.state.step:
            return self.ckpt.root / step_dir_name(self.state.step)
        self._saved_step = self.state.step
        self.state.data = data if data is not None else self.reader.state_dict()
        path = self.ckpt.save(self.state.step, {"data": data} if data is not None else None)
        if self.is_main:
            log.info("checkpoint %s", path)
        return path

    @property
    def sample_generator(self) -> torch.nn.Module:
        return self.ema.module if self.ema else self.generator

    def _evaluate(self) -> None:
        """In-loop metrics on EMA samples; a new best (lower `metrics.best`) is checkpointed and copied to best/."""
        values = self.report.evaluate(self.sample_generator, self.state.step, self.state.images_seen)
        key = self.cfg.metrics.best
        value = values.get(key)
        if value is None or (self.state.best and value >= self.state.best["value"]):
            return
        self.state.best = {"metric": key, "value": value, "step": self.state.step}
        folder = self.save_checkpoint()
        if self.is_main:
            best = self.ckpt.promote_best(folder)
            log.info("new best %s=%.4f at step %d -> %s", key, value, self.state.step, best)

    # ------------------------------------------------------------------ run
    def fit(self) -> int:
        """Train to `total_steps`; returns 0 when done, EXIT_INTERRUPTED after a signal-triggered save (or a
        signal during start-up, with nothing to save)."""
        own = not self.interrupt.installed
        if own:
            self.interrupt.install()
        try:
            return self._fit()
        finally:
            if own:
                self.interrupt.restore()

    def _fit(self) -> int:
        if self._startup_interrupted():
            return self._exit_startup()
        lock, refusal = self.run.lock(), None
        if self.is_main:  # global rank 0 holds the lock for all ranks
            try:
                lock.acquire()
            except RunLockedError as err:
                refusal = err
        if not self._agree(refusal is None):
            raise refusal or RunLockedError(f"{self.run.root} is in use by another writer (see rank 0's error)")
        try:
            latest = self.ckpt.latest()
            if latest is not None:
                self._restore(latest)
                if self.is_main:
                    log.info("resumed from %s (step %d of %d)", latest, self.state.step, self.total_steps)
            if self.state.step >= self.total_steps:
                if self.is_main:
                    log.info("run %s is already at step %d of %d: nothing to do", self.run.root,
                             self.state.step, self.total_steps)
                return EXIT_DONE
            if self._startup_interrupted():
                return self._exit_startup()
            self._check_free_space()
            if self.is_main:
                self.run.write_config(self.cfg)
                log.info("training on %s x %d in %s (train.mixed_precision=%s)", self.device.type, self.world,
                         precision_name(self.precision), self.cfg.train.mixed_precision)
            try:
                self.report.start(self.state, precision_name(self.precision), self.total_steps)
                if self._startup_interrupted():
                    return self._exit_startup()
                return self._loop(lock)
            except BaseException as err:
                self.report.fail(err)
                raise
        finally:
            lock.release()

    def _startup_interrupted(self) -> bool:
        """Whether a signal arrived during start-up, agreed by all ranks (each start-up phase asks)."""
        return bool(self.interrupt) if self.world == 1 else not self._agree(not self.interrupt)

    def _exit_startup(self) -> int:
        self.report.finish("KILLED")
        if self.is_main:
            log.warning("interrupted by signal %s during start-up: nothing new to save, exiting with %d (resumable)",
                        self.interrupt.signum, EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED

    def _checkpoint_bytes(self) -> int:
        """One checkpoint's size before any exists: the weights, and Adam's two moments per parameter."""
        modules = [self.generator, self.discriminator] + ([self.ema.module] if self.ema else [])
        weights = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())
        params = [p for opt in (self.opt_g, self.opt_d) for group in opt.param_groups for p in group["params"]]
        return weights + 2 * sum(p.numel() * p.element_size() for p in params)

    def _check_free_space(self) -> None:
        """Refuse to train when one checkpoint would not fit: finding out at the first save wastes the steps."""
        need = self.ckpt.expected_bytes = self._checkpoint_bytes()
        free = shutil.disk_usage(self.run.root).free if self.is_main else need
        if not self._agree(free >= need):
            raise CheckpointError(f"{self.run.checkpoints}: {free / 1e6:.1f} MB free, but one checkpoint needs "
                                  f"about {need / 1e6:.1f} MB: free space or raise the quota, then run the same "
                                  "command again" if self.is_main else f"{self.run.root}: no room for a "
                                  "checkpoint (see rank 0's error)")

    def _loop(self, lock: RunLock) -> int:
        tcfg, ccfg = self.cfg.train, self.cfg.checkpoint
        stats = StepStats(self.device, self.state.images_seen)
        milestones = set(ccfg.milestones)
        compiling = tcfg.compile
        while self.state.step < self.total_steps:
            try:
                stats.add(self.step())
            except StepAborted as aborted:
                return self._exit_interrupted(data=aborted.data)
            step = self.state.step
            lock.heartbeat()
            if compiling:  # reported on its own, and kept out of images/s
                compiling = False
                stats.sync()
                compile_s = stats.restart_clock(self.state.images_seen)
                log.info("torch.compile (%s) + first step: %.1f s", tcfg.compile_mode, compile_s)
                self.report.write(step, self.state.images_seen, {"compile_s": compile_s})
            if step % tcfg.log_every == 0 or step == self.total_steps:
                record = stats.record(self.state.images_seen, self.reader.num_images)
                if self.augment is not None:
                    record["augment_p"] = self.augment.p
                self.report.log_step(step, self.total_steps, self.state.images_seen, record)
            self.report.tick()
            if step % tcfg.sample_every == 0:
                self.report.samples(self.sample_generator, step)
            if self.report.metrics and step % self.cfg.metrics.every == 0:
                self._evaluate()
            if step % ccfg.every == 0 or step in milestones:
                self.save_checkpoint()
            if step < self.total_steps and self._should_stop():
                return self._exit_interrupted()
        self.save_checkpoint()
        if self.state.step % tcfg.sample_every:
            self.report.samples(self.sample_generator, self.state.step)
        self.report.finish("FINISHED", self.sample_generator)
        if self.is_main:
            log.info("done: step %d, run folder %s", self.state.step, self.run.root)
        return EXIT_DONE

    def _exit_interrupted(self, data: dict[str, Any] | None = None) -> int:
        """Save and report; with `data` (an aborted step's start) the trainer is left for exit only."""
        self.save_checkpoint(data)
        self.report.finish("KILLED")
        if self.is_main:
            log.warning("interrupted by signal %s %s step %d: checkpoint saved, exiting with %d (resumable)",
                        self.interrupt.signum, "during the step after" if data is not None else "at",
                        self.state.step, EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED


def train(cfg: Config, run_dir: str | Path, signals: Sequence[int] = ()) -> int:
    """`signals`: ones that arrived before this was called (the CLI records them while torch imports)."""
    interrupt = InterruptFlag().install()
    if signals and interrupt.signum is None:
        interrupt.signum = signals[0]
    try:
        return Trainer(cfg, run_dir, interrupt=interrupt).fit()
    finally:
        interrupt.restore()
        release_distributed()
