"""`hpcgan bench --quality`: how soon hpcgan's presets reach the quality the classic loop reaches.

Throughput alone can mislead: a faster step that learns less per image gains nothing. Here the classic
loop (`reference`: main.py's arithmetic, fp32, BCE, batch 128) and one or more of hpcgan's presets train
on the same slices for the same training seconds, one after the other, each in a fresh process (`timed`),
which snapshots samples of fixed latents with the clock paused. Afterwards every snapshot is scored
against held-out real slices under one protocol, the real-vs-real floors under the same protocol, and
the seconds each preset needed to reach the classic loop's final SWD are read off its curve.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hpcgan.metrics as M
from hpcgan.bench.flops import device_name
from hpcgan.bench.images import BenchImages, bench_images
from hpcgan.bench.plan import QualityPlan
from hpcgan.bench.suite import package_versions
from hpcgan.bench.throughput import REFERENCE as REFERENCE_LOOP
from hpcgan.bench.timed import INDEX
from hpcgan.config import Config, ConfigError, build_config, to_dict
from hpcgan.data import DataError, load_images, load_split
from hpcgan.data.pixels import to_unit
from hpcgan.metrics.registry import NO_FEATURES

log = logging.getLogger(__name__)

REFERENCE = "reference"
REFERENCE_BATCH = 128
SWD_SETS = 4  # at most this many disjoint sets of generated slices per SWD, averaged
INTERPOLATION = "linear between the two snapshots around the crossing"


@dataclass(frozen=True)
class RealSets:
    """Real slices, uint8 (N, C, H, W): `train` (what both loops train on), `heldout` (what snapshots are
    scored against) and `others` (real slices outside `heldout`, for the train-vs-held-out floor)."""

    train: torch.Tensor
    heldout: torch.Tensor
    others: torch.Tensor
    heldout_split: str  # "val", or "half of train" when the data has no held-out split


def real_sets(images: BenchImages, seed: int) -> RealSets:
    if images.shards:
        train = load_split(images.path, "train", images.resolution)
        heldout = load_split(images.path, "val", images.resolution)
        if len(heldout):
            return RealSets(train, heldout, train, "val")
    else:
        train = load_images(images.path)
    log.warning("%s has no held-out (val) slices: scoring against a random half of the training slices, "
                "which both loops train on", images.path)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    half = len(train) // 2
    return RealSets(train, train[order[:half]], train[order[half:]], "half of train")


def feature_space(images: BenchImages, cfg: Config, device: torch.device,
                  progress: Callable[[str], None]) -> tuple[M.FeatureExtractor | None, str]:
    """The network precision/recall are measured in (a TorchScript file when configured, else the data
    set's offline encoder, trained here once per data set when shards have none cached: a minute or two
    on a CPU, nothing downloaded) and its description; without one, None and why."""
    def load() -> M.FeatureExtractor | None:
        return M.load_extractor(cfg.metrics.inception_weights, device, data=images.path, resolution=images.resolution)

    extractor = load()
    if extractor is None and images.shards:
        progress("training the offline feature space for precision/recall (hpcgan features; cached)")
        M.train_features(images.path, resolution=images.resolution)
        extractor = load()
    if extractor is None:
        return None, NO_FEATURES
    return extractor, str(getattr(extractor, "description", extractor.name))


class Scorer:
    """One protocol for every snapshot of both loops and for the real floors.

    SWD is hpcgan.metrics' "swd" (x1e3, mean over the pyramid levels) of `n` held-out slices against a set
    of `n` others, averaged over `sets` disjoint sets, with the same patch positions every time. MS-SSIM
    diversity takes all generated slices; precision/recall (k=3) the same sets as SWD.
    """

    def __init__(self, real: RealSets, samples: int, device: torch.device,
                 extractor: M.FeatureExtractor | None, seed: int) -> None:
        self.n = scored_count(real, samples)
        self.sets = max(1, min(SWD_SETS, samples // self.n, len(real.others) // self.n,
                               len(real.train) // (2 * self.n)))
        self.real, self.device, self.extractor, self.seed = real, device, extractor, seed
        pick = torch.randperm(len(real.heldout), generator=torch.Generator().manual_seed(seed))[:self.n]
        self.heldout = to_unit(real.heldout[pick]).to(device)
        self.heldout_features = M.extract(extractor, self.heldout) if extractor is not None else None

    def _split(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [images[k * self.n:(k + 1) * self.n] for k in range(self.sets)]

    def _shuffled(self, images: torch.Tensor, salt: int) -> torch.Tensor:
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed + salt))
        return to_unit(images[order[:2 * self.sets * self.n]]).to(self.device)

    def _against_heldout(self, images: torch.Tensor) -> dict[str, float]:
        sets = self._split(images)
        out = {"swd": statistics.fmean(M.swd(self.heldout, s, seed=self.seed)["swd"] for s in sets)}
        if self.heldout_features is not None:
            pr = [M.precision_recall(self.heldout_features, M.extract(self.extractor, s)) for s in sets]
            out.update({key: statistics.fmean(p[key] for p in pr) for key in ("precision", "recall")})
        return out

    def score(self, fake: torch.Tensor) -> dict[str, float]:
        """SWD, MS-SSIM diversity and (with a feature space) precision/recall of uint8 samples."""
        unit = to_unit(fake).to(self.device)
        return {**self._against_heldout(unit), "msssim": M.ms_ssim_diversity(unit, seed=self.seed)}

    def floors(self) -> dict[str, float]:
        """Real slices scored as if generated: training slices against the held-out ones (`floor_*`), and
        one half of the training slices against the other (`floor_halves_swd`); `msssim_real` is the
        training slices' own MS-SSIM diversity, what a generator should match."""
        others = self._against_heldout(self._shuffled(self.real.others, 1))
        train = self._shuffled(self.real.train, 2)
        first, second = self._split(train), self._split(train[self.sets * self.n:])
        halves = statistics.fmean(M.swd(a, b, seed=self.seed)["swd"] for a, b in zip(first, second))
        return {**{f"floor_{key}": value for key, value in others.items()}, "floor_halves_swd": halves,
                "msssim_real": M.ms_ssim_diversity(to_unit(self.real.train).to(self.device), seed=self.seed)}

    def memorization(self, fake: torch.Tensor) -> dict[str, float | str]:
        """The audit of `fake` against every training slice, calibrated on the held-out split when there
        is one (else leave-one-out on the training slices)."""
        heldout = to_unit(self.real.heldout).to(self.device) if self.real.heldout_split == "val" else None
        audit = M.memorization_audit(to_unit(self.real.train).to(self.device), to_unit(fake).to(self.device),
                                     heldout=heldout)
        return audit.summary()


def scored_count(real: RealSets, samples: int) -> int:
    """n: the slices on each side of every comparison; checked before any training."""
    n = min(samples, len(real.heldout), len(real.train) // 2)
    if n < 4:
        raise DataError(f"{n} slices per comparison; the quality bench needs at least 4 held-out slices, "
                        "twice as many training slices and 4 samples")
    return n


def seconds_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first training second at which `curve` ((seconds, value) pairs, lower is better) reaches
    `target`, interpolated linearly between the snapshots around the crossing; None if it never does."""
    for i, (seconds, value) in enumerate(curve):
        if value <= target:
            if i == 0:
                return seconds
            before, was = curve[i - 1]
            return before + (seconds - before) * (was - target) / (was - value)
    return None


def _run_side(spec: dict[str, Any]) -> dict[str, Any]:
    folder = Path(spec["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    spec_file = folder / "spec.json"
    spec_file.write_text(json.dumps(spec, indent=1) + "\n")
    proc = subprocess.run([sys.executable, "-m", "hpcgan.bench.timed", str(spec_file)], stdout=sys.stderr)
    if proc.returncode:
        raise RuntimeError(f"the {spec['side']} loop failed with exit code {proc.returncode} (its output is above)")
    return json.loads((folder / INDEX).read_text())


def _reference_config(cfg: Config, overrides: list[str]) -> Config:
    """main.py's defaults at the preset's resolution and channels, batch 128; --set model.* sizes it too."""
    sizes = [o for o in overrides if o.split("=", 1)[0].strip().startswith("model.")]
    return build_config(overrides=[f"model.resolution={cfg.model.resolution}", f"model.channels={cfg.model.channels}",
                                   f"train.batch_size={REFERENCE_BATCH}", *sizes])


def _side_summary(label: str, run: dict[str, Any], curve: list[dict[str, Any]]) -> dict[str, Any]:
    final = curve[-1]
    return {"loop": label, "train_precision": run["precision"], "swd": final["swd"], "msssim": final["msssim"],
            **{key: final[key] for key in ("precision", "recall") if key in final},
            **{key: run[key] for key in ("train_s", "steps", "images_seen", "images_per_s", "sampling_s",
                                         "diverged")},
            "curve": curve}


def measure_quality(plan: QualityPlan, workdir: Path,
                    progress: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON-ready result and each loop's final samples (uint8)."""
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    budget, every = plan.budget(device.type), plan.every(device.type)
    resolutions = {build_config(files=[p], overrides=plan.overrides).model.resolution for p in plan.presets}
    if len(resolutions) > 1:
        raise ConfigError(f"presets {', '.join(plan.presets)} train at different resolutions {sorted(resolutions)}: "
                          "race presets of one resolution (or --set model.resolution=...)")
    (resolution,) = resolutions
    progress(f"{resolution}px: preparing images")
    images = bench_images(plan.data, resolution, workdir)
    real = real_sets(images, plan.seed)
    scored_count(real, plan.samples)
    configs = {Path(p).stem: build_config(files=[p], overrides=[*plan.overrides, f"data.path={images.path}"])
               for p in plan.presets}
    cfg = next(iter(configs.values()))
    reference_cfg = _reference_config(cfg, plan.overrides)
    sides = [REFERENCE, *configs]
    labels = {REFERENCE: REFERENCE_LOOP, **{name: f"hpcgan ({name})" for name in configs}}
    common = {"budget_s": budget, "every_s": every, "samples": plan.samples, "seed": plan.seed}
    specs = {REFERENCE: {"side": "reference", "config": to_dict(reference_cfg), "root": str(images.reference_root)},
             **{name: {"side": "hpcgan", "config": to_dict(c)} for name, c in configs.items()}}
    runs = {}
    for side in sides:
        progress(f"{labels[side]}: {budget:g} s of training, a snapshot of {plan.samples} samples every {every:g} s")
        runs[side] = _run_side({**specs[side], **common, "folder": str(workdir / "quality" / side)})

    progress("scoring every snapshot")
    extractor, space = feature_space(images, cfg, device, progress)
    scorer = Scorer(real, plan.samples, device, extractor, plan.seed)
    quality: dict[str, Any] = {
        "budget_s": budget, "every_s": every, "samples": plan.samples, "eval_images": scorer.n,
        "swd_sets": scorer.sets, "seed": plan.seed,
        "data": {"origin": images.origin, "train": len(real.train), "heldout": len(real.heldout),
                 "heldout_split": real.heldout_split},
        "presets": list(configs), "overrides": plan.overrides,
        "configs": {name: to_dict(c) for name, c in configs.items()},
        "pr": {"feature_space": space} if extractor is not None else {"skipped": space},
        "notes": ["training seconds exclude sampling and the writing of snapshots (the clock is paused); "
                  "the first step's warm-up (and compilation, if a preset compiles) counts",
                  f"the presets' train.steps/epochs do not apply: every loop trains for {budget:g} s"],
    }
    if real.heldout_split != "val":
        quality["notes"].append("no held-out split: scored against a random half of the training slices")
    finals, loops = {}, {}
    for side in sides:
        folder = workdir / "quality" / side
        curve = []
        for point in runs[side]["points"]:
            fake = torch.load(folder / point["file"])
            curve.append({key: point[key] for key in ("seconds", "step", "images_seen")} | scorer.score(fake))
        finals[side] = fake
        loops[side] = _side_summary(labels[side], runs[side], curve)
        loops[side]["memorization"] = scorer.memorization(fake)
        if runs[side]["diverged"]:
            quality["notes"].append(f"{labels[side]} diverged (non-finite statistics) by step "
                                    f"{runs[side]['diverged']['step']}: its curve ends at the last finite snapshot")
    m = reference_cfg.model
    loops[REFERENCE]["settings"] = {"batch": REFERENCE_BATCH, "nz": m.nz, "ngf": m.ngf, "ndf": m.ndf,
                                    "lr": reference_cfg.train.lr, "beta1": reference_cfg.train.beta1,
                                    "loss": "BCE (Sigmoid + BCELoss)", "workers": 2}
    quality["loops"] = loops
    quality.update(scorer.floors())
    target = loops[REFERENCE]["swd"]
    if target >= loops[REFERENCE]["curve"][0]["swd"]:
        quality["notes"].append("the reference ended no better than its untrained generator (SWD); the budget is "
                                "too short to compare the loops")
    for name in configs:
        reached = seconds_to_reach([(p["seconds"], p["swd"]) for p in loops[name]["curve"]], target)
        loops[name]["seconds_to_reference_swd"] = reached
        loops[name]["speedup_to_reference_swd"] = loops[REFERENCE]["train_s"] / reached if reached else None
    quality["best_preset"] = min(configs, key=lambda name: loops[name]["swd"])
    quality["interpolation"] = INTERPOLATION
    quality["elapsed_s"] = time.perf_counter() - start
    result = {"mode": plan.mode, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": shlex.join(["hpcgan", *sys.argv[1:]]), "versions": package_versions(),
              "device": {"type": device.type, "name": device_name(device), "cores": os.cpu_count() or 1,
                         "threads": torch.get_num_threads()},
              "quality": quality}
    return result, finals


# ---------------------------------------------------------------------------------------------- report

def table(result: dict[str, Any]) -> str:
    q = result["quality"]
    data = q["data"]
    lines = [f"Time to quality: {q['budget_s']:g} s of training per loop on {result['device']['type']} "
             f"({result['device']['name']}), {data['train']} training slices ({data['origin']})",
             f"scored against {q['eval_images']} held-out slices ({data['heldout_split']}); SWD x1e3, mean over "
             f"levels and over {q['swd_sets']} set(s) of {q['eval_images']} samples", ""]
    loops = q["loops"]
    pr = "precision" in loops[REFERENCE]
    head = f"{'':<36}{'train s':>8}{'steps':>7}{'img/s':>8}{'SWD':>8}{'MS-SSIM':>9}"
    head += f"{'prec':>7}{'recall':>7}" if pr else ""
    lines.append(head + f"{'memorized':>10}")
    for s in loops.values():
        row = (f"{s['loop'] + ', ' + s['train_precision']:<36}{s['train_s']:>8.1f}{s['steps']:>7}"
               f"{s['images_per_s'] or 0:>8.1f}{s['swd']:>8.2f}{s['msssim']:>9.3f}")
        row += f"{s['precision']:>7.3f}{s['recall']:>7.3f}" if pr else ""
        lines.append(row + f"{s['memorization']['memorization']:>10.1%}")
    blank = f"{'':<8}{'':<7}{'':<8}"
    floor = f"{'real floor: train vs held-out':<36}{blank}{q['floor_swd']:>8.2f}{q['msssim_real']:>9.3f}"
    floor += f"{q['floor_precision']:>7.3f}{q['floor_recall']:>7.3f}" if pr else ""
    lines += [floor, f"{'real floor: halves of train':<36}{blank}{q['floor_halves_swd']:>8.2f}", ""]
    if not pr:
        lines.append(f"precision/recall skipped: {q['pr']['skipped']}")
    lines.append(f"{'snapshot':<10}" + "".join(f"{name[:10] + ' s':>14}{'SWD':>8}" for name in loops))
    for i, points in enumerate(zip_longest(*(s["curve"] for s in loops.values()))):
        cells = [f"{p['seconds']:>14.1f}{p['swd']:>8.2f}" if p else " " * 22 for p in points]
        lines.append(f"{i:<10}{''.join(cells)}")
    target = loops[REFERENCE]["swd"]
    lines.append("")
    for name in q["presets"]:
        s, reached = loops[name], loops[name]["seconds_to_reference_swd"]
        if reached is None:
            lines.append(f"{s['loop']} did not reach the reference's final SWD ({target:.2f}) within "
                         f"{s['train_s']:.0f} s of training")
        else:
            sooner = s["speedup_to_reference_swd"]
            lines.append(f"{s['loop']} reached the reference's final SWD ({target:.2f}) after {reached:.1f} s of "
                         f"training" + (f", {sooner:.1f}x sooner" if sooner else "") + f" ({INTERPOLATION})")
    if len(q["presets"]) > 1:
        lines.append(f"lowest final SWD at equal training time: {q['best_preset']}")
    lines += [f"note: {note}" for note in q["notes"]]
    return "\n".join(lines)


def _grid(images: torch.Tensor, count: int = 64, pad: int = 2) -> np.ndarray:
    """The first `count` uint8 (N, C, H, W) images tiled row-major on white: (rows*H, cols*W[, C])."""
    tiles = images[:count].permute(0, 2, 3, 1).numpy()
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    tiles = np.pad(tiles, ((0, rows * cols - len(tiles)), (pad, 0), (pad, 0), (0, 0)), constant_values=255)
    n, h, w, c = tiles.shape
    grid = tiles.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
    grid = np.pad(grid, ((0, pad), (0, pad), (0, 0)), constant_values=255)
    return grid[..., 0] if c == 1 else grid


def write_figures(result: dict[str, Any], finals: dict[str, torch.Tensor], base: Path) -> dict[str, str]:
    """`<base>-swd.png` (SWD over training seconds, every loop, the floors) and `<base>-samples.png`
    (every loop's final samples side by side, labelled)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    q = result["quality"]
    paths = {"swd": base.with_name(base.name + "-swd.png"), "samples": base.with_name(base.name + "-samples.png")}
    fig = Figure(figsize=(8, 5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    loops = q["loops"]
    for s, style in zip(loops.values(), ("o-", "s-", "^-", "v-", "d-", "p-")):
        ax.plot([p["seconds"] for p in s["curve"]], [p["swd"] for p in s["curve"]], style, label=s["loop"])
    ax.axhline(q["floor_swd"], color="black", linestyle="--", label="real floor: train vs held-out")
    ax.axhline(q["floor_halves_swd"], color="grey", linestyle=":", label="real floor: halves of train")
    for name in q["presets"]:
        if (reached := loops[name]["seconds_to_reference_swd"]) is not None:
            ax.plot([reached], [loops[REFERENCE]["swd"]], "kx", markersize=10,
                    label=f"{name} at the reference's final SWD: {reached:.0f} s")
    ax.set(yscale="log", xlabel="training seconds (sampling excluded)", ylabel="SWD x1e3 (mean over levels)",
           title=f"Time to quality on {result['device']['type']}: {q['budget_s']:g} s per loop")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.savefig(paths["swd"])

    fig = Figure(figsize=(6 * len(loops), 6.6), dpi=120, layout="constrained")
    for i, (side, s) in enumerate(loops.items()):
        ax = fig.add_subplot(1, len(loops), i + 1)
        ax.imshow(_grid(finals[side]), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"{s['loop']}\nafter {s['train_s']:.0f} s ({s['steps']} steps), SWD {s['swd']:.2f}")
        ax.axis("off")
    fig.savefig(paths["samples"])
    return {name: str(path) for name, path in paths.items()}


def run_quality(plan: QualityPlan, workdir: Path, out: Path | None) -> int:
    """Measure, print the table, and with `out` write the JSON there and the figures next to it."""
    start = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[bench {time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr, flush=True)

    result, finals = measure_quality(plan, workdir, progress)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            result["quality"]["figures"] = write_figures(result, finals, out.with_suffix(""))
        except ImportError as err:  # matplotlib comes with mlflow; a trimmed install may lack it
            result["quality"]["notes"].append(f"figures not drawn: {err}")
    print(table(result))
    if out is not None:
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {out}" + "".join(f", {path}" for path in result["quality"].get("figures", {}).values()))
    return 0
