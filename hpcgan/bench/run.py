"""`hpcgan bench [--quick] [--quality] [--json FILE]`: hpcgan against the reference DCGAN loop, on the same images.

Prints a table and, with --json, writes every figure, the targets with their margins, device, versions
and the command. --quick (CI, a few minutes on 2 CPU cores) times 64px at batch 128 only, in few short
repeats, and skips the multi-process scaling run. --quality measures time to quality instead of
throughput (`quality`); with --quick, on a short budget. Imports stay inside `run` because the CLI
imports this module to build its parser for every subcommand; the measuring lives in `suite`.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hpcgan.bench.plan import MODES, QUALITY_BUDGET_S, STAGES, Plan, QualityPlan
from hpcgan.config import ConfigError

def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 64,128") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
    return values


def _peak(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if sep and name in ("fp32", "bf16", "fp16"):
            return name, float(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: expected PRECISION=TFLOPS, e.g. bf16=989.4")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="CI mode: 64px, batch 128, short repeats, no scaling run (a few minutes on 2 cores); "
                             "with --quality, a 60 s budget per loop")
    parser.add_argument("--json", metavar="FILE", help="write all results here")
    parser.add_argument("--data", help="image folder or prepared shard folder (default: the quickstart MNI152 "
                                       "slices, prepared in the work folder)")
    parser.add_argument("--resolutions", type=_ints, help="comma-separated (full default 64,128; quick 64)")
    parser.add_argument("--batches", type=_ints, help="comma-separated global batch sizes (full default 128,512; "
                                                      "quick 128)")
    parser.add_argument("--warmup", type=int, help="untimed steps per loop before the repeats (default 1)")
    parser.add_argument("--steps", type=int, help="timed steps per repeat (full 3, quick 2)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per loop (full 3, quick 3)")
    parser.add_argument("--skip", action="append", default=[], choices=STAGES, help="leave a stage out (repeatable)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compilation)")
    parser.add_argument("--peak-tflops", dest="peaks", action="append", default=[], type=_peak,
                        metavar="PREC=TFLOPS", help="device peak for MFU, e.g. bf16=989.4 (overrides the table)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every hpcgan loop; model sizes also apply to the reference")
    parser.add_argument("--workdir", help="keep prepared data, runs and logs here (default: a temporary folder)")
    quality = parser.add_argument_group("time to quality (--quality)")
    quality.add_argument("--quality", action="store_true",
                         help="instead of throughput: train the reference loop and hpcgan's preset for the same "
                              "seconds each, score samples along the way, report when hpcgan reaches the "
                              "reference's final SWD")
    quality.add_argument("--budget", type=float, metavar="SECONDS",
                         help=f"training seconds per loop (default {QUALITY_BUDGET_S['cpu']:g} on CPU, "
                              f"{QUALITY_BUDGET_S['cuda']:g} on a GPU, {QUALITY_BUDGET_S['quick']:g} with --quick)")
    quality.add_argument("--every", type=float, metavar="SECONDS",
                         help="training seconds between sample snapshots (default: budget / 10)")
    quality.add_argument("--quality-preset", metavar="NAME_OR_YAML[,...]",
                         help="hpcgan's configs to race against the reference, comma-separated: presets under "
                              "hpcgan/configs or YAML files (default quickstart; e.g. quickstart,fastgan)")
    quality.add_argument("--quality-samples", type=int, metavar="N",
                         help="samples of fixed latents per snapshot, the same for both loops (default 512)")


QUALITY_FLAGS = {"budget": "--budget", "every": "--every", "quality_preset": "--quality-preset",
                 "quality_samples": "--quality-samples"}
THROUGHPUT_FLAGS = {"resolutions": "--resolutions", "batches": "--batches", "warmup": "--warmup", "steps": "--steps",
                    "repeats": "--repeats", "skip": "--skip", "compile": "--compile", "peaks": "--peak-tflops"}


def _given(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    return [flag for key, flag in flags.items() if getattr(args, key) not in (None, False, [])]


def _presets(text: str) -> tuple[str, ...]:
    presets = tuple(p.strip() for p in text.split(",") if p.strip())
    names = [Path(p).stem for p in presets]
    if not presets or len(set(names)) < len(names) or "reference" in names:
        raise ConfigError(f"--quality-preset {text!r}: give one or more presets with distinct names, none "
                          "called 'reference'")
    return presets


def make_quality_plan(args: argparse.Namespace) -> QualityPlan:
    if given := _given(args, THROUGHPUT_FLAGS):
        raise ConfigError(f"{', '.join(given)}: throughput options, not used by --quality "
                          "(the preset sets sizes; change them with --set)")
    for key in ("budget", "every", "quality_samples"):
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            raise ConfigError(f"{QUALITY_FLAGS[key]} must be positive")
    return QualityPlan(mode="quick" if args.quick else "full", data=args.data,
                       presets=_presets(args.quality_preset or "quickstart"), budget_s=args.budget, every_s=args.every,
                       samples=args.quality_samples or 512, overrides=list(args.overrides))


def make_plan(args: argparse.Namespace) -> Plan:
    if given := _given(args, QUALITY_FLAGS):
        raise ConfigError(f"{', '.join(given)}: options of --quality")
    mode = "quick" if args.quick else "full"
    given = {key: getattr(args, key) for key in ("resolutions", "batches", "warmup", "steps", "repeats")}
    settings = {**MODES[mode], **{key: value for key, value in given.items() if value is not None}}
    if settings["warmup"] < 0 or settings["steps"] < 1 or settings["repeats"] < 1:
        raise ConfigError("needs --warmup >= 0, --steps >= 1 and --repeats >= 1")
    for key, flag in (("train.batch_size", "--batches"), ("model.resolution", "--resolutions")):
        if any(override.split("=", 1)[0].strip() == key for override in args.overrides):
            raise ConfigError(f"--set {key}=... would be hidden under the table's sizes; "
                              f"use {flag} instead")
    return Plan(mode=mode, data=args.data, skip=frozenset(args.skip) | ({"scaling"} if args.quick else set()),
                compile=args.compile, peaks=dict(args.peaks), overrides=list(args.overrides), **settings)


@contextmanager
def _workdir(path: str | None) -> Iterator[Path]:
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
    else:
        with tempfile.TemporaryDirectory(prefix="hpcgan-bench-") as tmp:
            yield Path(tmp)


def run(args: argparse.Namespace) -> int:
    logging.getLogger("hpcgan").setLevel(logging.WARNING)  # the trainers' info lines would bury the table
    if args.quality:
        from hpcgan.bench.quality import run_quality

        plan = make_quality_plan(args)
        out = Path(args.json) if args.json else Path(args.workdir) / "quality.json" if args.workdir else None
        with _workdir(args.workdir) as workdir:
            return run_quality(plan, workdir, out)

    from hpcgan.bench.report import evaluate, table
    from hpcgan.bench.suite import measure

    plan = make_plan(args)
    with _workdir(args.workdir) as workdir:
        result = measure(plan, workdir)
    targets = evaluate(result)
    result["targets"] = [t.to_dict() for t in targets]
    print(table(result, targets))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0
