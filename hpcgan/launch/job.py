"""The callable submitit runs on every task of a job: SLURM environment in, `hpcgan train` out.

Requeue protocol. submitit installs its own handler for the preemption signal (USR2 by default) and
ignores SIGTERM; the trainer replaces both for the duration of training, so that any of USR1, USR2 or
TERM only sets a flag and the checkpoint is written at the next step boundary, agreed by all ranks.
When training returns "interrupted" because of submitit's signal, rank 0 re-raises that signal after
the save: submitit's handler then does what it always does (pickles `checkpoint()`'s resubmission and
runs `scontrol requeue`). After SIGTERM (preemption without user signal, `scontrol requeue`) SLURM
requeues the job by itself. Either way the new job finds the run folder and resumes from it; its
arguments are the same strings, never pickled state.
"""

from __future__ import annotations

import logging
import os
import signal

import submitit

log = logging.getLogger(__name__)


def export_distributed_env() -> None:
    """MASTER_ADDR/PORT (port derived from the job id, stable across requeues), RANK, WORLD_SIZE,
    LOCAL_RANK from the SLURM (or submitit local) environment, for Accelerate's env:// rendezvous."""
    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    # Processes per node share its cores; without this each would start one thread per core.
    tasks_per_node = max(env.num_tasks // max(env.num_nodes, 1), 1)
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", "0")) or max((os.cpu_count() or 1) // tasks_per_node, 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(cpus))


class TrainJob(submitit.helpers.Checkpointable):
    """`hpcgan train ARGV` as a checkpointable submitit job."""

    def __call__(self, argv: list[str]) -> str:
        from hpcgan.cli import build_parser, resolve_train_config, setup_logging
        from hpcgan.train import EXIT_INTERRUPTED, Trainer
        from hpcgan.train.distributed import release_distributed
        from hpcgan.train.signals import InterruptFlag

        export_distributed_env()
        setup_logging()
        args = build_parser().parse_args(["train", *argv])
        interrupt = InterruptFlag().install()  # before the trainer is built: start-up is interruptible too
        try:
            trainer = Trainer(resolve_train_config(args), args.out, interrupt=interrupt)
            code = trainer.fit()
        finally:
            interrupt.restore()  # submitit's handlers back, for the hand-over below
            release_distributed()
        if code == EXIT_INTERRUPTED:
            signum = trainer.interrupt.signum
            preempt_signal = submitit.JobEnvironment._usr_sig()
            if signum == preempt_signal and trainer.is_main:
                log.info("handing %s to submitit to requeue the job", signal.Signals(signum).name)
                signal.raise_signal(signum)  # submitit's handler: checkpoint() + requeue, then exits
            # SIGTERM (scontrol requeue, preemption): SLURM requeues by itself. Exiting without a
            # result keeps submitit from recording this job as finished.
            raise SystemExit(EXIT_INTERRUPTED)
        return f"finished at step {trainer.state.step} in {args.out}"
