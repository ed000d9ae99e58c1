"""`hpcgan evaluate`: every metric that can be computed for a trained run, into metrics.json and MLflow.

Generated slices come from the run's EMA generator; the real reference is the held-out (val) split of
a shard folder, or the images themselves for a plain folder; the memorization audit searches the
training split, calibrated on the held-out one; the classifier two-sample test (`c2st`) trains on
training slices against half the generated ones and is tested on held-out slices against the other
half. Every number is printed beside its real floor (train
vs held-out, and halves of train, under the same protocol), and feature metrics name their feature
space: an Inception file when given, else the data set's offline encoder (`hpcgan features`). A metric
that cannot run (no feature space) is reported as skipped with its reason, never faked; the exit code
is non-zero only on an error.

`--utility` runs the downstream utility test instead (`hpcgan.metrics.utility`): a small fixed classifier
trained on real, synthetic, real+synthetic and augmented real slices, tested on held-out real slices,
into utility.json, utility.png and MLflow. It needs a conditional run and a labelled shard folder: the
synthetic slices are generated for the classes of the real training slices, as many per class, and
chosen as `hpcgan sample` chooses them when its selection flags are given.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

import hpcgan.metrics as M
import hpcgan.metrics.utility as U
from hpcgan.config import ConfigError
from hpcgan.data import load_labelled, load_real, shards
from hpcgan.data.pixels import to_unit
from hpcgan.export import MAX_ROUNDS, Selection, select, selection_line
from hpcgan.train.checkpoint import CheckpointManager, resolve_checkpoint
from hpcgan.train.conditioning import allocate
from hpcgan.train.generator import load_generator
from hpcgan.train.run_folder import RunFolder, config_of
from hpcgan.train.evaluation import real_floors
from hpcgan.train.samples import generate

ALL = ["swd", "fid", "kid", "pr", "dc", "msssim", "memorization", "c2st"]
TRAIN_SPLIT = ("memorization", "c2st")  # metrics that read the training split besides the held-out one


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
    parser.add_argument("--utility", action="store_true",
                        help="downstream utility test instead of the quality metrics: a fixed classifier trained "
                             "on real, synthetic, real+synthetic and augmented real slices, tested on held-out "
                             "real slices (needs a conditional run and labelled shards)")
    parser.add_argument("--seeds", type=int, default=3, help="--utility: classifier seeds, from --seed on (>= 3)")
    parser.add_argument("--synthetic-ratio", type=float, default=1.0,
                        help="--utility: synthetic slices per real slice in the real+synthetic arm")
    parser.add_argument("--steps", type=int, default=U.ClassifierSettings.steps,
                        help="--utility: optimizer steps of every classifier (the same budget for each arm)")
    parser.add_argument("--filter-d-quantile", type=float, default=0.0, metavar="Q",
                        help="--utility: choose the synthetic slices as `hpcgan sample` does, dropping the share Q "
                             "the discriminator finds least real")
    parser.add_argument("--truncation-z", type=float, default=0.0, metavar="T",
                        help="--utility: redraw latent components with |z| > T, as `hpcgan sample` does")
    parser.add_argument("--class-check", type=float, default=0.0, metavar="P",
                        help="--utility: keep only synthetic slices that a classifier trained on real slices gives "
                             "their class a probability of at least P, as `hpcgan sample` does")


def output_folder(run: Path, checkpoint: Path) -> RunFolder:
    """Where evaluation results go: the run folder when given one, else the checkpoint folder."""
    return RunFolder(run) if RunFolder(run).is_run() else RunFolder(checkpoint)


def generated_labels(n: int, counts: list[int], seed: int) -> torch.Tensor:
    """`n` class labels in the training data's proportions, in a seeded random order. Metrics that compare
    equal-sized sets (SWD, precision/recall) read the first len(real) generated slices: in class order
    those would all be of the first class."""
    labels = allocate(n, counts)
    return labels[torch.randperm(n, generator=torch.Generator().manual_seed(seed + 4))]


def evaluate_run(run: Path, data: str, names: list[str], n: int, weights: str, seed: int,
                 ema: bool = True) -> tuple[dict, Path]:
    """Distribution metrics against the held-out split; the memorization audit against the training
    split, its threshold calibrated on the held-out split when the data has one; the classifier
    two-sample test trained on training slices vs half the generated ones, tested on held-out slices
    vs the other half (halves of the held-out slices without a split)."""
    folder = resolve_checkpoint(run)
    generator = load_generator(folder, ema=ema)
    counts = list((CheckpointManager.read_state(folder).get("classes") or {}).values())
    labels = generated_labels(n, counts, seed) if counts else None
    fake = generate(generator, torch.randn(n, generator.nz, generator=torch.Generator().manual_seed(seed)), labels)
    size = fake.shape[-1]
    real = load_real(data, split="val", size=size)
    pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))[:n]
    out_dir = output_folder(run, folder).evaluation
    distribution = [m for m in names if m not in TRAIN_SPLIT]
    extractor = M.load_extractor(weights, data=data if shards.is_shard_dir(Path(data)) else None, resolution=size)
    result = M.evaluate(distribution, to_unit(real[pick]), fake, extractor=extractor, seed=seed,
                        out_dir=out_dir) if distribution else {}
    floored = distribution + (["c2st"] if "c2st" in names else [])
    result.update(real_floors(data, floored, size, min(n, len(real)), seed, extractor))
    if set(TRAIN_SPLIT) & set(names):
        train = to_unit(load_real(data, split="train", size=size))
        heldout = to_unit(real) if shards.is_shard_dir(Path(data)) and len(real) else None
        if "memorization" in names:
            result.update(M.evaluate(["memorization"], train, fake, heldout=heldout, seed=seed, out_dir=out_dir))
        if "c2st" in names:
            few = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 3))[:n]
            result.update(M.evaluate(["c2st"], train[few], fake, heldout=heldout[pick] if heldout is not None
                                     else None, seed=seed))
    return result, folder


def run(args: argparse.Namespace) -> int:
    if args.utility:
        return run_utility(args)
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
    _log_to_mlflow(run_dir, {f"eval/{k}": v for k, v in result.items() if isinstance(v, float)}, step)
    return 0


def utility_run(run: Path, data: str | None = None, *, seeds: int = 3, ratio: float = 1.0, steps: int = U.ClassifierSettings.steps,
                seed: int = 0, ema: bool = True, selection: Selection = Selection()) -> tuple[dict[str, Any], Path]:
    """The utility report of a conditional run on a labelled shard folder (default: the run's data.path),
    and the checkpoint folder used.

    Synthetic slices: the run's (EMA) generator, `U.synthetic_counts` per class, latents drawn with `seed`,
    chosen by `selection` as `hpcgan sample` chooses them (without its memorization audit, which guards a
    release, not a measurement); classifier seeds `seed`, `seed + 1`, ...
    """
    if seeds < 3:
        raise ConfigError(f"--seeds {seeds}: the utility test reports a spread over at least 3 seeds")
    if steps < 1 or ratio < 0:
        raise ConfigError(f"--steps {steps} --synthetic-ratio {ratio}: need steps >= 1 and a ratio >= 0")
    folder = resolve_checkpoint(run)
    cfg = config_of(folder)
    model, data = cfg.model, data or cfg.data.path
    how = "hpcgan prepare SRC --out SHARDS --labels folder|axis|contrast|TABLE.csv"
    if not shards.is_shard_dir(Path(data)):
        raise ConfigError(f"{data}: not a shard folder; the utility test needs labelled shards with a val split "
                          f"({how})")
    train_x, train_y, classes = load_labelled(data, "train", model.resolution)
    if not classes:
        raise ConfigError(f"{data}: the shards carry no class labels, so no classifier can be trained on them; "
                          f"prepare them with labels ({how})")
    num_classes = model.num_classes
    if num_classes == 0:
        raise ConfigError(f"{run}: the run is not conditional, so it cannot generate slices of a class; train one "
                          f"on {data} with --set model.conditional=true")
    state = CheckpointManager.read_state(folder)
    trained = list(state.get("classes") or {})
    if trained != list(classes):
        raise ConfigError(f"{run} generates the classes {', '.join(trained)}, {data} has {', '.join(classes)}: "
                          "pass the labelled shards the run was trained on")
    test_x, test_y, _ = load_labelled(data, "val", model.resolution)
    if len(test_y) == 0:
        raise ConfigError(f"{data}: the val split is empty, and the utility test scores on held-out real slices; "
                          "re-run hpcgan prepare with a val split (--val-frac)")
    generator = load_generator(folder, ema=ema)
    counts = U.synthetic_counts(U.class_counts(train_y, num_classes), ratio)
    labels = torch.repeat_interleave(torch.arange(num_classes), torch.tensor(counts))
    discriminator, classifier, check = selection.judges(folder, cfg, seed)
    fake, labels, _, chosen = select(generator, labels, len(labels), seed, 256, None, None, selection,
                                     discriminator, classifier)
    if check:
        chosen["class_check"].update(check)
    for name, wanted, kept in zip(classes, counts, torch.bincount(labels, minlength=num_classes).tolist()):
        if kept < wanted:
            raise ConfigError(f"--class-check {selection.class_check}: {kept} of {wanted} {name} slices passed in "
                              f"{MAX_ROUNDS} draws; lower the threshold")
    result = U.utility_test((train_x, train_y), (test_x, test_y), (fake, labels), classes,
                            seeds=range(seed, seed + seeds), ratio=ratio, settings=U.ClassifierSettings(steps=steps),
                            progress=print)
    return {"checkpoint": str(folder), "step": state["step"], "data": data, "ema": ema, "generation_seed": seed,
            "selection": chosen, **result}, folder


def run_utility(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    selection = Selection(d_quantile=args.filter_d_quantile, truncation_z=args.truncation_z,
                          class_check=args.class_check)
    report, folder = utility_run(run_dir, args.data, seeds=args.seeds, ratio=args.synthetic_ratio, steps=args.steps,
                                 seed=args.seed, ema=not args.no_ema, selection=selection)
    out = output_folder(run_dir, folder)
    out.utility_report.write_text(json.dumps(report, indent=1))
    plot_utility(report, out.utility_plot)
    print(utility_table(report))
    print(f"wrote {out.utility_report} and {out.utility_plot}")
    values = {f"utility/{_mlflow_name(arm)}/{name}{suffix}": spread[key]
              for arm, by_score in report["arms"].items() for name, spread in by_score.items()
              for suffix, key in (("", "mean"), ("_std", "std"))}
    values |= {f"utility/generated/{_mlflow_name(c)}": s["mean"] for c, s in report["generated_class_accuracy"].items()}
    _log_to_mlflow(run_dir, values, report["step"], artifacts=(out.utility_report, out.utility_plot),
                   artifact_path="utility")
    return 0


def _mlflow_name(name: str) -> str:
    """MLflow metric names take letters, digits and `_-. `; arms (`real+synthetic`) and class names may not."""
    return re.sub(r"[^\w.\- ]", "_", name)


def utility_table(report: dict[str, Any]) -> str:
    """The arms as rows, each score as mean +- std over the seeds; then the conditional-generation check."""
    header = f"{'arm':<30}" + "".join(f"{name:>22}" for name in U.SCORES)
    rows = [f"{arm:<30}" + "".join(f"{s[name]['mean']:>14.3f} ± {s[name]['std']:.3f}" for name in U.SCORES)
            for arm, s in report["arms"].items()]
    generated = "  ".join(f"{c} {s['mean']:.3f} ± {s['std']:.3f}" for c, s in report["generated_class_accuracy"].items())
    chosen = f"synthetic slices: {selection_line(report['selection'])}" if report.get("selection") else None
    return "\n".join([f"downstream utility on held-out real slices ({len(report['seeds'])} seeds, {report['steps']} "
                      "steps per classifier; mean ± std)", *([chosen] if chosen else []), header, *rows,
                      f"real classifier on generated slices, accuracy per requested class: {generated}",
                      report["best_use"]])


def plot_utility(report: dict[str, Any], path: Path) -> Path:
    """Grouped bars: one group per score, one bar per arm, the seeds' std as error bars."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax = fig.add_subplot()
    arms = list(report["arms"])
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        means = [report["arms"][arm][name]["mean"] for name in U.SCORES]
        stds = [report["arms"][arm][name]["std"] for name in U.SCORES]
        ax.bar([j + (i - (len(arms) - 1) / 2) * width for j in range(len(U.SCORES))], means, width, yerr=stds,
               capsize=3, label=arm)
    ax.set_xticks(range(len(U.SCORES)), [name.replace("_", " ") for name in U.SCORES])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"on held-out real slices (mean ± std, {len(report['seeds'])} seeds)")
    ax.set_title(f"downstream utility, step {report['step']}: {len(report['classes'])} classes, "
                 f"{report['steps']} classifier steps, synthetic ratio {report['synthetic_ratio']:g}")
    fig.legend(loc="outside right center", fontsize="small")
    fig.savefig(path, dpi=90)
    return path


def _log_to_mlflow(run_dir: Path, values: dict[str, float], step: int, artifacts: tuple[Path, ...] = (),
                   artifact_path: str | None = None) -> None:
    """Into the run's own MLflow run when it has one; a tracking outage only costs a warning."""
    info = RunFolder(run_dir).read_tracking()
    if info is None:
        return
    from hpcgan.track import Tracker

    tracker = Tracker(uri=info["tracking_uri"], experiment=info["experiment"], run_name="", params={}, tags={},
                      run_id=info["run_id"])
    tracker.log_metrics(values, step)
    for path in artifacts:
        tracker.log_artifact(path, artifact_path)
    if tracker.close(status="FINISHED", timeout_s=30):
        print(f"logged to MLflow run {info['run_id']} at {info['tracking_uri']}")
