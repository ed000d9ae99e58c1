"""The training loop: GAN steps under Accelerate, with checkpoints, logging and interruption.

The loop knows nothing of SLURM: it sees a run folder, a world size (from the environment Accelerate
reads) and signals. It knows G, D, the augmentation and the EMA only through small interfaces; every
stateful part is registered once with the checkpoint manager, so a resumed run produces bit-identical
weights to an uninterrupted one on CPU.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hpcgan.config import Config
from hpcgan.data import Reader, build_reader
from hpcgan.data.reader import WorkerLost
from hpcgan.models import build_models
from hpcgan.augment import build_augment
from hpcgan.models.ema import EMA, ema_decay
from hpcgan.models.losses import d_loss, g_loss, r1_penalty
from hpcgan.train.checkpoint import (MODEL_FILE, STATE_FILE, CheckpointError, CheckpointManager, Source,
                                     step_dir_name)
from hpcgan.train.conditioning import check_classes, resolve_classes, run_classes, step_labels
from hpcgan.train.distributed import (agree, carry_rank0_augment, from_global_position, highest, rederive_rng,
                                     release_distributed, resume_on_new_world, resume_seed, share)
from hpcgan.train.guard import EXIT_DIVERGED, Guard, all_finite
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
                                      milestones=cfg.checkpoint.milestones, rank=self.rank, agree=self._agree,
                                      share=lambda value: share(value, self.world, self.device))
        self.guard = Guard(cfg, self.device, scaled=self.acc.scaler is not None)
        self._base_lrs = [[group["lr"] for group in opt.param_groups] for opt in (self.opt_g, self.opt_d)]
        self._initial: dict[str, bytes] | None = None  # the rollback target until the first checkpoint
        self._register_parts()
        # One CPU process runs a step synchronously for seconds; an interrupt that arrives before D's
        # update undoes the step and saves at once rather than finishing it, halving the worst-case
        # signal-to-exit time. On a GPU the host is ahead of the device anyway, and several ranks would
        # have to agree mid-step.
        self._abortable = self.device.type == "cpu" and self.world == 1
        self._buffers = [*generator.buffers(), *discriminator.buffers()]
        self._self_supervised = getattr(discriminator, "self_supervised", False)
        self._saved_step = -1
        self._steps_taken = 0  # by this process: before the first, a restart rebuilds the same state
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
        ckpt.register_rank("data", self.reader, reshard=from_global_position)
        ckpt.register_rank("rng", GlobalRNG(), reshard=rederive_rng)
        if self.augment is not None:  # per rank: each rank's augmentation stream is its own
            ckpt.register_rank("augment", self.augment, reshard=carry_rank0_augment)

    def _agree(self, ok: bool) -> bool:
        return agree(ok, self.world, self.device, self.cfg.train.dist_timeout_s)

    # ------------------------------------------------------------------ resume
    def _restore(self, folder: Path) -> None:
        self._load(folder)
        self.state.restarts += 1
        self._apply_lr_factor()

    def _load(self, source: Source) -> None:
        """Load a checkpoint; one written by another number of processes continues in global terms."""
        classes = self.state.classes
        if not self.ckpt.load(source) or self.state.world_size != self.world:
            change = resume_on_new_world(source, self.state, self.ckpt.rank_parts(), seed=self.cfg.seed,
                                         rank=self.rank, world=self.world, global_batch=self.cfg.train.batch_size)
            if self.is_main:
                log.info("%s", change)
        check_classes(self.state.classes, classes, self.cfg.data.path)
        self.state.world_size = self.world
        self._saved_step = self.state.step

    def _apply_lr_factor(self) -> None:
        """Rates lowered by rollbacks: the configured ones times the state's factor."""
        if self.state.lr_factor != 1.0:
            for opt, base in zip((self.opt_g, self.opt_d), self._base_lrs):
                for group, lr in zip(opt.param_groups, base):
                    group["lr"] = lr * self.state.lr_factor

    def _rollback(self, why: str, at_most: int | None = None) -> bool:
        """Back to the newest intact checkpoint (at step <= `at_most`), or to the initial state when there
        is none yet, with the learning rates times `train.rollback_lr_factor`; the data continues past the
        bad stretch and the noise is drawn afresh. False (nothing done) once `train.max_rollbacks` are spent."""
        tcfg = self.cfg.train
        if self.state.rollbacks >= tcfg.max_rollbacks:
            return False
        source: Source | None = self.ckpt.latest(at_most) or self._initial
        if source is None:
            return False
        kept = {k: getattr(self.state, k) for k in ("restarts", "mlflow_run_id", "best", "bad_steps", "rollbacks",
                                                      "lr_factor")}
        position, before = self.reader.state_dict(), self.state.step
        self._load(source)
        for key, value in kept.items():
            setattr(self.state, key, value)
        self.state.rollbacks += 1
        self.state.lr_factor *= tcfg.rollback_lr_factor
        self._apply_lr_factor()
        self.reader.load_state_dict(position)
        seed_everything(resume_seed(self.cfg.seed, self.rank, self.state.step, f"rollback {self.state.rollbacks}"))
        self.ckpt.discard_after(self.state.step)
        self.guard.reset(self.state.step)
        rollbacks, step = self.state.rollbacks, self.state.step
        if self.is_main:
            where = source if isinstance(source, Path) else "the initial state"
            log.warning("rollback %d of %d at step %d: %s; back to step %d (%s) with lr x%g, data continues "
                        "past the bad stretch", rollbacks, tcfg.max_rollbacks, before, why, step, where,
                        self.state.lr_factor)
        self.report.tag("hpcgan.rollbacks", str(rollbacks))
        self.report.write(step, self.state.images_seen, {"rollbacks": rollbacks, "lr_factor": self.state.lr_factor})
        return True

    def _give_up(self, why: str) -> int:
        self.report.tag("hpcgan.gave_up", why)
        self.report.finish("FAILED")
        if self.is_main:
            log.error("giving up at step %d after %d rollback(s) (train.max_rollbacks=%d): %s; lower train.lr or "
                      "check the data; no checkpoint holds non-finite weights", self.state.step,
                      self.state.rollbacks, self.cfg.train.max_rollbacks, why)
        return EXIT_DIVERGED

    # ------------------------------------------------------------------ step
    def step(self) -> torch.Tensor:
        """Take the next batch, update D then G, advance the counters; returns device-side statistics.

        Raises StepAborted, with weights, BatchNorm statistics and RNG back at the previous step boundary,
        when an interrupt arrives before D's update on an abortable (single CPU process) trainer.
        """
        if not self._abortable:
            real, labels = self._next_batch()
            stats = self._train_step(real, labels)
        else:
            before = StepSnapshot(self.reader, self._buffers, self.augment)
            try:
                real, labels = self._next_batch()
                stats = self._train_step(real, labels)
            except StepAborted as aborted:
                before.restore()
                self.opt_d.zero_grad(set_to_none=True)
                aborted.data = before.data
                raise
        self.state.step += 1
        self._steps_taken += 1
        self.state.images_seen += self.cfg.train.batch_size
        if self.augment is not None:
            self.augment.adjust(self.state.step, self.cfg.train.batch_size)
        return stats

    def _next_batch(self):
        """The reader's next batch. A dead data worker stops the run like a preemption: the step goes on with
        new workers (every rank must reach the next agreement), then all ranks save and exit 75; a second
        loss in a row is an error."""
        try:
            return self.reader.next_batch()
        except WorkerLost as lost:
            log.warning("%s: new workers take over; checkpointing after this step, then exiting with %d "
                        "(resumable)", lost, EXIT_INTERRUPTED)
            self.interrupt.worker_lost()
            return self.reader.next_batch()

    def _see(self, images: torch.Tensor) -> torch.Tensor:
        """What D is shown: every image, real or fake, goes through the same augmentation."""
        return self.augment(images) if self.augment is not None else images

    def _train_step(self, real: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        tcfg = self.cfg.train
        if tcfg.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        z = torch.randn(real.shape[0], self.cfg.model.nz, device=self.device)
        guard = self.guard if self.guard.enabled else None
        nan = float("nan") if self.guard.inject(self.state.step + 1, self.state.rollbacks) else 0.0
        labels, fake_y = step_labels(labels, self.cfg.model.num_classes, tcfg.class_balance)
        self.opt_d.zero_grad(set_to_none=True)
        fake = self.G(z, fake_y)
        self._abort_point()
        do_r1 = tcfg.r1_gamma > 0 and self.state.step % tcfg.r1_every == 0
        real = real.detach().requires_grad_(do_r1)
        # A compiled graph has no double backward: R1 steps run D (still DDP-wrapped) eagerly.
        D = getattr(self.D, "_orig_mod", self.D) if do_r1 else self.D
        if self._self_supervised:  # D also learns to redraw real slices (fastgan)
            real_logits, reconstruction = D(self._see(real), labels, reconstruct=True)
        else:
            real_logits, reconstruction = D(self._see(real), labels), None
        fake_logits = D(self._see(fake.detach()), fake_y)
        self._abort_point()
        loss_d = d_loss(real_logits, fake_logits, tcfg.loss)
        if reconstruction is not None:
            loss_d = loss_d + reconstruction
        if nan:
            loss_d = loss_d + nan
        if do_r1:
            scale = self.acc.scaler.get_scale() if self.acc.scaler is not None else 1.0
            loss_d = loss_d + r1_penalty(real_logits, real, scale) * (tcfg.r1_gamma / 2 * tcfg.r1_every)
        self.acc.backward(loss_d)
        self._abort_point()  # the last one: from D's update on, the step runs to its end
        if guard:
            guard.check(self.opt_d.optimizer, loss_d)
        self.opt_d.step()
        if self.augment is not None:
            self.augment.observe(guard.observed(real_logits.detach()) if guard else real_logits.detach())

        self.opt_g.zero_grad(set_to_none=True)
        # D's weight gradients from the G step would be discarded: neither computed (a third of D's
        # backward) nor all-reduced. Only the gradient w.r.t. D's input flows back into G.
        self.discriminator.requires_grad_(False)
        try:
            with self.acc.no_sync(self.D):
                fake_logits_g = self.D(self._see(fake), fake_y)
                loss_g = g_loss(fake_logits_g, tcfg.loss)
                if nan:
                    loss_g = loss_g + nan
                self.acc.backward(loss_g)
        finally:
            self.discriminator.requires_grad_(True)
        if guard:
            guard.check(self.opt_g.optimizer, loss_g)
        self.opt_g.step()
        if self.ema:
            self.ema.update(self.state.step)
        with torch.no_grad():
            stats = torch.stack([loss_d.detach(), loss_g.detach(), torch.sigmoid(real_logits.float()).mean(),
                                 torch.sigmoid(fake_logits.float()).mean(), torch.sigmoid(fake_logits_g.float()).mean()])
            return guard.end_step(stats) if guard else stats

    def _abort_point(self) -> None:
        if self._abortable and self.interrupt:
            raise StepAborted

    # ------------------------------------------------------------------ side effects
    def _should_stop(self) -> bool:
        """All ranks agree on an interrupt and on its reason, the highest signal number any rank got (a data
        worker's death on one rank must requeue the job from rank 0); across ranks only every `sync_every`
        steps (a host sync)."""
        if self.world == 1:
            return bool(self.interrupt)
        if self.state.step % self.cfg.train.sync_every:
            return False
        signum = highest(self.interrupt.signum or 0, self.world, self.device, self.cfg.train.dist_timeout_s)
        if signum:
            self.interrupt.signum = signum
        return bool(self.interrupt)

    def save_checkpoint(self, data: dict[str, Any] | None = None) -> Path | None:
        """Commit the current step; `data`: the reader's position when it is not the reader's own.
        With the guard on, non-finite weights are never saved: None then (the caller rolls back)."""
        if self._saved_step == self.state.step:
            return self.ckpt.root / step_dir_name(self.state.step)
        if self.guard.enabled:
            nets = [self.generator, self.discriminator, *([self.ema.module] if self.ema else [])]
            if not self._agree(bool(all_finite(nets))):
                if self.is_main:
                    log.warning("step %d: weights are not finite, no checkpoint written", self.state.step)
                return None
        self._saved_step = self.state.step
        self.state.data = data if data is not None else self.reader.state_dict()
        path = self.ckpt.save(self.state.step, {"data": data} if data is not None else None)
        self._initial = None
        if self.is_main:
            log.info("checkpoint %s", path)
        return path

    @property
    def sample_generator(self) -> torch.nn.Module:
        return self.ema.module if self.ema else self.generator

    def _evaluate(self) -> str | None:
        """In-loop metrics on EMA samples; a new best (lower `metrics.best`) is checkpointed and copied to best/.
        Returns why the guard wants a rollback, or None."""
        values = self.report.evaluate(self.sample_generator, self.state.step, self.state.images_seen)
        key = self.cfg.metrics.best
        value = values.get(key)
        if value is None or not math.isfinite(value):
            return None
        best = self.state.best["value"] if self.state.best else None
        why = self.guard.evaluated(self.state.step, value, best) if self.guard.enabled else None
        if best is not None and value >= best:
            return why
        folder = self.save_checkpoint()
        if folder is None:
            return "weights are not finite at a new best"
        self.state.best = {"metric": key, "value": value, "step": self.state.step}
        if self.is_main:
            best_folder = self.ckpt.promote_best(folder)
            log.info("new best %s=%.4f at step %d -> %s", key, value, self.state.step, best_folder)
        return None

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
            elif self.guard.enabled:
                self._initial = self.ckpt.snapshot()
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
                if not self._steps_taken:  # the state a restart rebuilds: nothing new to save
                    return self._exit_startup()
                return self._exit_interrupted(data=aborted.data)
            step = self.state.step
            lock.heartbeat()
            if compiling:  # reported on its own, and kept out of images/s
                compiling = False
                stats.sync()
                compile_s = stats.restart_clock(self.state.images_seen)
                log.info("torch.compile (%s) + first step: %.1f s", tcfg.compile_mode, compile_s)
                self.report.write(step, self.state.images_seen, {"compile_s": compile_s})
            why, at_most, boundary = None, None, False  # the guard's reason to roll back, and to where
            if step % tcfg.log_every == 0 or step == self.total_steps:
                record = stats.record(self.state.images_seen, self.reader.num_images)
                if self.augment is not None:
                    record["augment_p"] = self.augment.p
                if self.guard.enabled:
                    bad, why = self.guard.read(record, step)
                    self.state.bad_steps += bad
                    boundary = True
                self.report.log_step(step, self.total_steps, self.state.images_seen, record)
            self.report.tick()
            if step % tcfg.sample_every == 0:
                self.report.samples(self.sample_generator, step)
            if self.report.metrics and step % self.cfg.metrics.every == 0:
                boundary = True
                if why is None and (why := self._evaluate()) is not None:
                    at_most = self.guard.good_step
            if (step % ccfg.every == 0 or step in milestones) and why is None:
                boundary = True
                if self.save_checkpoint() is None:
                    why = "weights are not finite at a checkpoint"
            if self.guard.enabled and boundary and not self._agree(why is None):
                if not self._rollback(why or "another rank's guard fired", at_most):
                    return self._give_up(why or "another rank's guard fired")
                stats.restart_clock(self.state.images_seen)
                continue
            if step < self.total_steps and self._should_stop():
                return self._exit_interrupted()
        if self.report.metrics and self.state.step % self.cfg.metrics.every:
            self._evaluate()  # the last step always has its numbers, whatever metrics.every
        if self.save_checkpoint() is None:  # non-finite weights at the end: back, and on from there
            if not self._rollback("weights are not finite at the end"):
                return self._give_up("weights are not finite at the end")
            return self._loop(lock)
        if self.state.step % tcfg.sample_every:
            self.report.samples(self.sample_generator, self.state.step)
        self.report.finish("FINISHED", self.sample_generator)
        if self.is_main:
            log.info("done: step %d, run folder %s", self.state.step, self.run.root)
        return EXIT_DONE

    def _evaluate_on_interrupt(self) -> bool:
        """After the save (so a grace period that runs out loses nothing): the last step's numbers, unless
        they exist, `metrics.on_interrupt` is off, or an evaluation of this process took longer than
        `metrics.on_interrupt_max_s`. Ranks agree, since every rank takes part."""
        mcfg, cost = self.cfg.metrics, self.report.eval_s
        if self.report.metrics is None or not mcfg.on_interrupt or self.state.step % mcfg.every == 0:
            return False  # the same on every rank: no need to agree
        return self._agree(cost is None or cost <= mcfg.on_interrupt_max_s)

    def _exit_interrupted(self, data: dict[str, Any] | None = None) -> int:
        """Save and report; with `data` (an aborted step's start) the trainer is left for exit only."""
        if self.save_checkpoint(data) is None and self.is_main:
            log.warning("the run resumes from its newest intact checkpoint")
        if self._evaluate_on_interrupt():
            self._evaluate()
        self.report.finish("KILLED")
        if self.is_main:
            log.warning("interrupted by %s %s step %d: checkpoint saved, exiting with %d (resumable)",
                        self.interrupt.name, "during the step after" if data is not None else "at",
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
