"""Cluster glue: submitit executors, SLURM environment -> torch.distributed, requeue on preemption.

The training loop never imports this package; it only sees signals, a run folder and a world size.
"""
