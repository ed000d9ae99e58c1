"""`hpcgan evaluate`: every metric that can be computed for a trained run, into metrics.json and MLflow.

Generated slices come from the run's EMA generator; the real reference is the held-out (val) split of
a shard folder, or the images themselves for a plain folder; the memorization audit searches the
training split, calibrated on the held-out one. Every number is printed beside its real floor (train
vs held-out, and halves of train, under the same protocol), and feature metrics name their feature
space: an Inception file when given, else the data set's offline encoder (`hpcgan features`). A metric
that cannot run (no feature space) is reported as skipped with its reason, never faked; the exit code
is non-zero only on an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import hpcgan.metrics as M
from hpcgan.data import load_real, shards
from hpcgan.data.pixels import to_unit
from hpcgan.train.checkpoint import CheckpointManager, resolve_checkpoint
from hpcgan.train.generator import load_generator
from hpcgan.train.run_folder import RunFolder, config_of
from hpcgan.train.evaluation import real_floors
from hpcgan.train.samples import generate

ALL = ["swd", "fid", "kid", "pr", "dc", "msssim", "memorization"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder (latest checkpoint) or checkpoint folder")
    parser.add_argument("--data", help="real data (shard folder, image folder, .pt); default: the run's data.path")
    parser.add_argument("--metrics", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument("--n", type=int, default=10000, help="generated slices (real ones: up to the same)")
    parser.add_argument("--inception-weights", default="",
                        help="TorchScript feature network (default: metrics.inception_weights or "
                             "$HPCGAN_INCEPTION_WEIGHTS); without it FID/KID are skipped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ema", action="store_true", help="evaluate the raw generator instead of the EMA copy")


def output_folder(run: Path, checkpoint: Path) -> RunFolder:
    """Where evaluation results go: the run folder when given one, else the checkpoint folder."""
    return RunFolder(run) if RunFolder(run).is_run() else RunFolder(checkpoint)


def evaluate_run(run: Path, data: str, names: list[str], n: int, weights: str, seed: int,
                 ema: bool = True) -> tuple[dict, Path]:
    """Distribution metrics against the held-out split; the memorization audit against the training
    split, its threshold calibrated on the held-out split when the data has one."""
    folder = resolve_checkpoint(run)
    generator = load_generator(folder, ema=ema)
    fake = generate(generator, torch.randn(n, generator.nz, generator=torch.Generator().manual_seed(seed)))
    size = fake.shape[-1]
    real = load_real(data, split="val", size=size)
    pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))[:n]
    out_dir = output_folder(run, folder).evaluation
    distribution = [m for m in names if m != "memorization"]
    extractor = M.load_extractor(weights, data=data if shards.is_shard_dir(Path(data)) else None, resolution=size)
    result = M.evaluate(distribution, to_unit(real[pick]), fake, extractor=extractor, seed=seed,
                        out_dir=out_dir) if distribution else {}
    result.update(real_floors(data, distribution, size, min(n, len(real)), seed, extractor))
    if "memorization" in names:
        train = load_real(data, split="train", size=size)
        heldout = to_unit(real) if shards.is_shard_dir(Path(data)) and len(real) else None
        result.update(M.evaluate(["memorization"], to_unit(train), fake, heldout=heldout, seed=seed,
                                 out_dir=out_dir))
    return result, folder


def run(args: argparse.Namespace) -> int:
    names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = sorted(set(names) - set(M.available()))
    if unknown:
        print(f"hpcgan evaluate: error: unknown metric(s) {', '.join(unknown)}; choose from {', '.join(M.available())}", file=sys.stderr)
        return 2
    run_dir = Path(args.run)
    folder = resolve_checkpoint(run_dir)
    cfg = config_of(folder)
    data = args.data or cfg.data.path
    weights = args.inception_weights or cfg.metrics.inception_weights
    if shards.is_shard_dir(Path(data)) and (mismatch := shards.split_mismatch(Path(data))):
        print(f"warning: {mismatch}", file=sys.stderr)
    result, folder = evaluate_run(run_dir, data, names, args.n, weights, args.seed, ema=not args.no_ema)
    step = CheckpointManager.read_state(folder)["step"]
    report = {"checkpoint": str(folder), "step": step, "data": data, "n": args.n, **result}
    out = output_folder(run_dir, folder).evaluation_report
    out.write_text(json.dumps(report, indent=1))
    shown = {k: v for k, v in result.items() if not k.startswith(("floor/", "floor_halves/"))}
    width = max(map(len, shown))
    for key, value in shown.items():
        floor = result.get(f"floor/{key}")
        beside = f"  (floor {floor:.6g}, halves of train {result[f'floor_halves/{key}']:.6g})" \
            if floor is not None else ""
        print(f"{key:<{width}}  {value:.6g}{beside}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    print(f"wrote {out}")
    _log_to_mlflow(run_dir, {k: v for k, v in result.items() if isinstance(v, float)}, step)
    return 0


def _log_to_mlflow(run_dir: Path, values: dict[str, float], step: int) -> None:
    """Into the run's own MLflow run when it has one; a tracking outage only costs a warning."""
    info = RunFolder(run_dir).read_tracking()
    if info is None:
        return
    from hpcgan.track import Tracker

    tracker = Tracker(uri=info["tracking_uri"], experiment=info["experiment"], run_name="", params={}, tags={},
                      run_id=info["run_id"])
    tracker.log_metrics({f"eval/{k}": v for k, v in values.items()}, step)
    if tracker.close(status="FINISHED", timeout_s=30):
        print(f"logged to MLflow run {info['run_id']} at {info['tracking_uri']}")
