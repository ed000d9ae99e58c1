"""The callable submitit runs on every task of a job: SLURM environment in, `hpcgan train` out.

Requeue protocol. submitit installs its own handler for the preemption signal (USR2 by default) and
ignores SIGTERM; the trainer replaces both for the duration of training, so that any of USR1, USR2 or
TERM only sets a flag and the checkpoint is written at the next step boundary, agreed by all ranks.
When training returns "interrupted" because of submitit's signal or a lost data worker, rank 0 raises
submitit's signal after the save: submitit's handler then does what it always does (pickles
`checkpoint()`'s resubmission and runs `scontrol requeue`). After SIGTERM (preemption without user
signal, `scontrol requeue`) SLURM requeues the job by itself. Every rank exits with 75. Either way
the new job finds the run folder and resumes from it; its arguments are the same strings, never
pickled state.
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
    # Processes per node share the cores they may run on (the CPU set SLURM gives the task, not the
    # machine's count); without this each would start one thread per core of the machine.
    tasks_per_node = max(env.num_tasks // max(env.num_nodes, 1), 1)
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", "0")) or max(len(os.sched_getaffinity(0)) // tasks_per_node, 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(cpus))


def requeue_unless_slurm_does(interrupt) -> None:
    """After submitit's signal (time limit) or a lost data worker nothing else requeues the job: submitit's
    handler does (checkpoint() + scontrol requeue). After SIGTERM (scontrol requeue, preemption) SLURM
    requeues by itself."""
    preempt = submitit.JobEnvironment._usr_sig()
    if interrupt.signum not in (preempt, signal.SIGCHLD):
        return
    log.info("%s: submitit requeues the job", interrupt.name)
    try:
        signal.raise_signal(preempt)
    except SystemExit:  # submitit's own exit (-1) after the requeue: the caller exits 75 like every rank
        pass


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
            interrupt.restore()  # submitit's handlers back, for the hand-over to them below
            if code == EXIT_INTERRUPTED and trainer.is_main:
                requeue_unless_slurm_does(trainer.interrupt)
        finally:
            # Rank 0's requeue happens before this barrier: with srun --kill-on-bad-exit, the first rank to
            # exit 75 ends the others, and rank 0 must not be ended before its `scontrol requeue`.
            interrupt.restore()
            release_distributed()
        if code == EXIT_INTERRUPTED:
            # Every rank the same code; exiting without a result keeps submitit from recording the job
            # as finished.
            raise SystemExit(EXIT_INTERRUPTED)
        return f"finished at step {trainer.state.step} in {args.out}"
