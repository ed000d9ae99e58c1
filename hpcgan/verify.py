"""`hpcgan checkpoint verify RUN`: check every checkpoint of a run folder, best/ included, against its marker.

One line per checkpoint (ok, or the file and the check that failed), then the one a resume would use.
Exit status 1 when any checkpoint is damaged, 0 when all are intact.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hpcgan.train.checkpoint import CheckpointError, CheckpointManager, step_of, verify
from hpcgan.train.run_folder import RunFolder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    check = actions.add_parser("verify", help="verify every checkpoint of a run folder (sizes and content hashes)")
    check.add_argument("run", type=Path, help="run folder")


def run(args: argparse.Namespace) -> int:
    folder = RunFolder(args.run)
    if not folder.is_run():
        raise CheckpointError(f"{args.run}: not a run folder (no checkpoints/ inside); give the --out of a training")
    manager = CheckpointManager(folder.checkpoints, keep=1)
    checkpoints = manager.step_folders() + ([folder.best] if folder.best.is_dir() else [])
    damaged = 0
    for checkpoint in checkpoints:
        problem = verify(checkpoint)
        damaged += problem is not None
        name = f"best (step {step_of(checkpoint)})" if checkpoint == folder.best else checkpoint.name
        print(f"{name}: {'ok' if problem is None else f'DAMAGED: {problem}'}")
    chosen = next((c for c in reversed(manager.step_folders()) if verify(c) is None), None)
    print(f"resume would use {chosen.name}" if chosen else "resume would start from step 0 (no intact checkpoint)")
    return 1 if damaged else 0
