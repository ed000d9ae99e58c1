"""The benchmark's stages in order, filling one JSON-ready result.

Order matters for fairness and cost: the training loops of each configuration run interleaved, each in
its own process (`worker`), and after every repeat the matmul limit is sampled in this process, so a
loop's fraction of it is paired under the same load (the samples, with those taken at the start and the
end, make the run's matmul figure); the checkpoint is taken from the headline configuration's trained
defaults before their process ends; readers, the interrupt and the scaling runs come last, each alone on
the machine.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from hpcgan.bench import checkpointing, scaling
from hpcgan.bench.flops import device_name, flops_per_image, matmul_tflops, peak_tflops, reference_flops_per_image
from hpcgan.bench.images import BenchImages, bench_images
from hpcgan.bench.readers import reader_images_per_s, reader_plan
from hpcgan.bench.plan import Plan
from hpcgan.bench.throughput import (DEFAULTS, GUARD_OFF, REFERENCE, Measured, Variant, interleave, precision, reference_for,
                                     resolve, variants)
from hpcgan.bench.worker import LoopProcess
from hpcgan.config import Config, build_config, to_dict
from hpcgan.train.precision import native_bf16


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "accelerate", "numpy", "pillow", "hpcgan", "nvidia-dali-cuda120", "webdataset"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        head = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[2]), "rev-parse", "--short",
                               "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            out["hpcgan_git"] = head.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _loops(measured: dict[str, Measured], chosen: list[tuple[Variant, Config]], per_image: dict[str, float],
           peaks: dict[str, float], matmul: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Per loop: images/s summary, FLOP/s, MFU, and two paired figures, each the median over repeats of a
    ratio within one repeat, as the loops and the matmul of one repeat ran back to back under the same
    load: the ratio to the reference, and the fraction of the matmul limit (`matmul`: one per repeat)."""
    ref = measured[REFERENCE]
    configs = {variant.name: (variant, cfg) for variant, cfg in chosen}
    loops = {}
    for name, m in measured.items():
        prec = precision(configs[name][1]) if name in configs else "fp32"
        flops = per_image["reference" if name == REFERENCE else "hpcgan"]
        loop: dict[str, Any] = {"name": name, **m.summary(), "tflops": m.median * flops / 1e12, "precision": prec}
        if prec in matmul[0]:
            loop["fraction_of_matmul_peak"] = statistics.median(
                run * flops / 1e12 / limits[prec] for run, limits in zip(m.runs, matmul))
        if name in configs:
            paired = [a / b for a, b in zip(m.runs, ref.runs)]  # same repeat, same load: drift cancels
            loop.update(ratio_vs_reference=statistics.median(paired), ratio_min=min(paired), ratio_max=max(paired),
                        ratio_of_medians=m.median / ref.median, overrides=list(configs[name][0].overrides))
        if loop["precision"] in peaks:
            loop["mfu"] = loop["tflops"] / peaks[loop["precision"]]
        loops[name] = loop
    return loops


def guard_cost(measured: dict[str, Measured], resolution: int, batch: int) -> dict[str, Any]:
    """The defaults' images/s over the same loop with the divergence guard off: the median of the ratios
    within each repeat (same load), with min and max."""
    if GUARD_OFF not in measured:
        return {"skipped": "the guard-off loop was not timed"}
    paired = [on / off for on, off in zip(measured[DEFAULTS].runs, measured[GUARD_OFF].runs)]
    return {"resolution": resolution, "batch": batch, "ratio": statistics.median(paired), "min": min(paired),
            "max": max(paired), "guard_on_images_per_s": measured[DEFAULTS].median,
            "guard_off_images_per_s": measured[GUARD_OFF].median}


class Suite:
    def __init__(self, plan: Plan, workdir: Path) -> None:
        self.plan, self.workdir, self.runs = plan, workdir, workdir / "runs"
        shutil.rmtree(self.runs, ignore_errors=True)  # a kept --workdir must not resume old runs
        self.start = time.perf_counter()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.bf16 = native_bf16(self.device)
        self.peaks = peak_tflops(self.device, plan.peaks)
        self.precisions = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if self.bf16 else {})}
        self.matmul_size = 8192 if self.device.type == "cuda" else 2048
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        self.result: dict[str, Any] = {
            "mode": plan.mode, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["hpcgan", *sys.argv[1:]]), "versions": package_versions(),
            "device": {"type": self.device.type, "name": device_name(self.device), "cores": cores,
                       "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                       "bf16_native": self.bf16},
            "load_average_before": load, "under_load": load / cores > 0.25,
            "settings": {"resolutions": plan.resolutions, "batches": plan.batches, "warmup": plan.warmup,
                         "steps": plan.steps, "repeats": plan.repeats, "overrides": plan.overrides,
                         "skipped": sorted(plan.skip)},
            "configs": [],
            "notes": ["reference: image grids every 100 iterations and the per-epoch torch.save are left out "
                      "(outside the per-iteration path)"],
        }
        if not self.bf16:
            self.result["notes"].append(f"bf16 not timed: this {self.device.type} has no native bf16 "
                                        "(emulated bf16 is far slower than fp32)")
        self._matmul_runs: dict[str, list[float]] = {p: [] for p in self.precisions}
        self.images: BenchImages | None = None  # at the headline resolution
        self.cfg: Config | None = None  # the headline configuration's defaults

    def progress(self, message: str) -> None:
        print(f"[bench {time.perf_counter() - self.start:6.1f} s] {message}", file=sys.stderr, flush=True)

    def measure(self) -> dict[str, Any]:
        self.matmul()
        data = []
        for res in self.plan.resolutions:
            self.progress(f"{res}px: preparing images")
            images = bench_images(self.plan.data, res, self.workdir)
            data.append(f"{images.count} images {res}x{res} from {images.origin}")
            for batch in self.plan.batches:
                self.train(images, batch)
        self.result["data"] = "; ".join(data)
        self.matmul()
        self.headline()
        if "readers" not in self.plan.skip:
            self.readers()
        self.interrupt()
        self.scaling()
        self.result["elapsed_s"] = time.perf_counter() - self.start
        self.result["load_average_after"] = os.getloadavg()[0]  # includes the bench's own load
        return self.result

    def matmul(self) -> None:
        self.progress(f"matmul limit ({', '.join(self.precisions)}, {self.matmul_size}^3)")
        for name, dtype in self.precisions.items():
            self._matmul_runs[name] += matmul_tflops(self.device, dtype, self.matmul_size)
        self.result["matmul"] = {p: {"tflops": statistics.median(runs), "runs": runs, "size": self.matmul_size}
                                 for p, runs in self._matmul_runs.items()}

    def matmul_sample(self) -> dict[str, float]:
        """One matmul figure per precision, taken between two repeats of the training loops."""
        sample = {}
        for name, dtype in self.precisions.items():
            runs = matmul_tflops(self.device, dtype, self.matmul_size)
            self._matmul_runs[name] += runs
            sample[name] = statistics.median(runs)
        return sample

    def train(self, images: BenchImages, batch: int) -> None:
        res, plan = images.resolution, self.plan
        base = build_config(overrides=[f"data.path={images.path}", f"model.resolution={res}",
                                       f"train.batch_size={batch}", *plan.overrides])
        chosen = resolve(base, variants(full=plan.mode == "full", bf16=self.bf16, compile=plan.compile))
        self.progress(f"{res}px batch {batch}: counting FLOPs")
        per_image = flops_per_image(base, self.runs / f"flops-{res}")
        small = build_config(base=to_dict(base), overrides=["train.batch_size=4"])
        reference_per_image = reference_flops_per_image(
            reference_for(small, images.reference_root, self.device, workers=0), batch=4)
        self.progress(f"{res}px batch {batch}: timing {len(chosen) + 1} loops, {plan.warmup} warm-up + "
                      f"{plan.repeats} x {plan.steps} steps each, interleaved")
        self.runs.mkdir(parents=True, exist_ok=True)
        specs = {variant.name: {"kind": "hpcgan", "config": to_dict(cfg),
                                "run_dir": str(self.runs / f"{res}-{batch}-{i}")}
                 for i, (variant, cfg) in enumerate(chosen)}
        specs[REFERENCE] = {"kind": "reference", "config": to_dict(base), "root": str(images.reference_root)}
        loops: dict[str, LoopProcess] = {}
        try:
            for i, (name, spec) in enumerate(specs.items()):
                loops[name] = LoopProcess(spec, self.runs / f"{res}-{batch}-{i}.log")
            for loop in loops.values():
                loop.receive()  # ready: all started together, so their imports overlap
            matmul: list[dict[str, float]] = []
            measured = interleave(loops, warmup=plan.warmup, steps=plan.steps, repeats=plan.repeats,
                                  after_repeat=lambda: matmul.append(self.matmul_sample()))
            flops = {"hpcgan": per_image, "reference": reference_per_image}
            self.result["configs"].append({"resolution": res, "batch": batch, "flops_per_image": per_image,
                                           "reference_flops_per_image": reference_per_image,
                                           "matmul_per_repeat": matmul,
                                           "loops": _loops(measured, chosen, flops, self.peaks, matmul)})
            if (res, batch) == plan.headline:
                self.images, self.cfg = images, base
                self.result["guard"] = guard_cost(measured, res, batch)
                if "checkpoint" not in plan.skip:
                    self.progress("checkpoint save and restore")
                    self.result["checkpoint"] = loops[DEFAULTS].call("checkpoint")
        finally:
            for loop in loops.values():
                loop.close()

    def headline(self) -> None:
        """The contract's single figures, from the headline configuration."""
        res, batch = self.plan.headline
        head = next(c for c in self.result["configs"] if (c["resolution"], c["batch"]) == (res, batch))
        defaults = head["loops"][DEFAULTS]
        self.result["train"] = {"variant": DEFAULTS, "resolution": res, "batch": batch,
                                "flops_per_image": head["flops_per_image"], "step_s": batch / defaults["images_per_s"],
                                **{k: defaults.get(k) for k in ("precision", "images_per_s", "ratio_vs_reference",
                                                                "tflops", "fraction_of_matmul_peak", "mfu")}}
        self.result["reference"] = {"images_per_s": head["loops"][REFERENCE]["images_per_s"], "loop": REFERENCE}
        self.result["readers_demand_images_per_s"] = max(
            loop["images_per_s"] for name, loop in head["loops"].items() if name != REFERENCE)

    def readers(self) -> None:
        plan, notes = reader_plan(self.images, self.device)
        self.result["readers"], self.result["reader_notes"] = {}, notes
        for name, (reader, device) in plan.items():
            self.progress(f"reader {name}")
            self.result["readers"][name] = reader_images_per_s(
                self.images, reader, device, batch=self.cfg.train.batch_size, workers=self.cfg.data.workers,
                warmup=2, batches=self.plan.reader_batches)

    def interrupt(self) -> None:
        if "interrupt" in self.plan.skip:
            self.result["interrupt"] = {"skipped": "--skip interrupt"}
            return
        phases = self.plan.interrupt_phases
        self.progress(f"interrupt: SIGUSR1 to a running hpcgan train, {len(phases)} times")
        self.result["interrupt"] = checkpointing.signal_to_exit(self.cfg, self.runs / "interrupt", phases)

    def scaling(self) -> None:
        train = self.result["train"]
        if "scaling" in self.plan.skip:
            self.result["scaling"] = {"skipped": "--quick" if self.plan.mode == "quick" else "--skip scaling"}
        elif self.device.type == "cuda":
            self.result["scaling"] = {"gpus": 1, "images_per_s": train["images_per_s"],
                                      "note": "one GPU: what a single device gives"}
        else:
            self.progress("weak scaling: 1 and 2 gloo processes")
            self.result["scaling"] = scaling.weak_scaling(self.cfg, self.runs, warmup=self.plan.warmup,
                                                          steps=self.plan.steps)
        flops = {c["resolution"]: c["flops_per_image"] for c in self.result["configs"]}
        basis = f"measured here: {self.device.type} step at {train['resolution']}px, batch {train['batch']}"
        self.result["projection"] = scaling.projections(self.cfg.model, (basis, train["step_s"]), flops)


def measure(plan: Plan, workdir: Path) -> dict[str, Any]:
    return Suite(plan, workdir).measure()
