"""`hpcgan prepare | train | sample | evaluate | bench | checkpoint verify`: thin argument parsing over the package."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from typing import NoReturn

from hpcgan.config import ConfigError


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("alembic", "mlflow", "urllib3", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="image folder, uint8 tensor file (.pt), prepared shard folder, "
                                       "or 'quickstart' (MNI152 slices shipped with nilearn)")
    parser.add_argument("--out", required=True, help="run folder; resumes automatically if it holds a checkpoint")
    parser.add_argument("--config", action="append", default=[], help="YAML config file (repeatable)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set train.lr=1e-4 (repeatable)")


def resolve_train_config(args: argparse.Namespace):
    """Defaults <- the run's saved config (on resume) <- --config files <- --data/--set."""
    from hpcgan.config import build_config
    from hpcgan.train.run_folder import RunFolder

    overrides = list(args.overrides)
    if args.data:
        overrides.insert(0, f"data.path={resolve_data(args.data)}")
    return build_config(base=RunFolder(args.out).saved_config(), files=args.config, overrides=overrides)


def resolve_data(data: str) -> str:
    if data != "quickstart":
        return data
    from hpcgan.data.quickstart import default_quickstart_dir, quickstart_shards

    return str(quickstart_shards(default_quickstart_dir()))


RECORDED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


def record_signals(arrived: list[int]) -> dict[int, object]:
    """Record the scheduler's signals into `arrived` from the first moment of `hpcgan train`: torch takes
    seconds to import, and start-up, like training, must end in a resumable exit, not death by the default
    handler. The trainer takes over the handlers and the signals that arrived meanwhile. Returns the
    handlers it replaced."""
    return {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum)) for sig in RECORDED_SIGNALS}


def cmd_train(args: argparse.Namespace) -> int:
    from hpcgan.train import train

    return train(resolve_train_config(args), args.out, signals=args.signals)


# Subcommands that live in their own modules (each exposes add_arguments(parser) and run(args) -> int);
# only the chosen one is imported, so `hpcgan train` does not pay for DICOM or metric imports.
MODULE_COMMANDS = {
    "prepare": ("hpcgan.data.prepare", "turn MRI volumes/slices into WebDataset shards"),
    "sample": ("hpcgan.export", "export synthetic slices (PNG, shards, NIfTI), audited and marked, with a data card"),
    "evaluate": ("hpcgan.evaluate", "compute quality metrics of a trained run"),
    "features": ("hpcgan.features", "train the offline feature space (FD/KID/PR without Inception) of a shard folder"),
    "bench": ("hpcgan.bench.run", "measure throughput (or, with --quality, time to quality) against the classic DCGAN loop"),
    "report": ("hpcgan.report", "write one self-contained HTML report of a run (curves, samples, evaluation, data)"),
    "checkpoint": ("hpcgan.verify", "verify a run's checkpoints (sizes and content hashes): `checkpoint verify RUN`"),
    "doctor": ("hpcgan.doctor", "preflight of this machine or job: devices, ranks, shared run folder, disk, MLflow, "
                                "partition, time limit"),
}


def chosen_command(argv: list[str] | None) -> str | None:
    return next((a for a in argv or [] if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcgan", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train (or resume) a GAN in a run folder")
    add_train_arguments(train)
    train.set_defaults(func=cmd_train)

    chosen = chosen_command(argv)
    for name, (module_name, help_text) in MODULE_COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(command)
            command.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    signals: list[int] = []
    previous = record_signals(signals) if chosen_command(argv) == "train" else {}
    try:
        return _run(argv, signals)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(argv: list[str], signals: list[int]) -> int:
    from hpcgan.data import DataError
    from hpcgan.train import CheckpointError, RunLockedError
    from hpcgan.train.distributed import PeerTimeout

    setup_logging()
    args = build_parser(argv).parse_args(argv)
    args.signals = signals
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, RunLockedError, PeerTimeout) as err:
        print(f"hpcgan {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.filename is None:  # not a file the user can do something about: a bug, keep its traceback
            raise
        from hpcgan.train.run_folder import os_error_line

        print(f"hpcgan {args.command}: error: {os_error_line(err)}", file=sys.stderr)
        return 2


def entry() -> NoReturn:
    """The `hpcgan` command. An interrupted run has committed its checkpoint and a scheduler's grace
    period is running out: it leaves without the interpreter's teardown (about a second here)."""
    code = main()
    from hpcgan.train import EXIT_INTERRUPTED

    if code == EXIT_INTERRUPTED:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed or broken pipe: nothing left to say there
                pass
        os._exit(code)
    sys.exit(code)
