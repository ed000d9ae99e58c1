"""The issue's targets checked against a result, and the result as a plain-text table.

A target that is not met says by how much: the shortfall for "at least" targets, the excess for "under"
targets. Targets that do not apply here (bf16 on a CPU without native bf16, GPU targets on a CPU) are
listed as n/a with the reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from hpcgan.bench.throughput import DEFAULTS, REFERENCE


@dataclass(frozen=True)
class Target:
    name: str
    goal: float
    measured: float | None  # None: not applicable or not measured, see `note`
    at_least: bool = True  # False: the measured value must stay under the goal
    unit: str = "x"
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured >= self.goal if self.at_least else self.measured < self.goal

    @property
    def margin(self) -> float | None:
        """Relative headroom: positive when met, negative by the fraction missing (or in excess)."""
        if self.measured is None:
            return None
        return self.measured / self.goal - 1 if self.at_least else 1 - self.measured / self.goal

    def verdict(self) -> str:
        if self.measured is None:
            return f"n/a ({self.note})"
        if self.met:
            ratio = self.measured / self.goal if self.at_least else self.goal / self.measured
            return f"met, {ratio:.0f}x the goal" if ratio >= 10 else f"met, {self.margin:+.0%} margin"
        if self.at_least:
            return f"NOT MET: {-self.margin:.0%} short of {self.goal:g}{self.unit}"
        return f"NOT MET: {-self.margin:.0%} over {self.goal:g}{self.unit}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met, "margin": self.margin}


def _loop(config: dict[str, Any], precision: str) -> dict[str, Any] | None:
    """The defaults when they run in `precision`, else the first variant that does."""
    loops = [config["loops"][DEFAULTS], *config["loops"].values()]
    return next((loop for loop in loops if loop.get("precision") == precision and loop["name"] != REFERENCE), None)


def _config(result: dict[str, Any], resolution: int, batch: int | None = None) -> dict[str, Any] | None:
    return next((c for c in result["configs"] if c["resolution"] == resolution
                 and (batch is None or c["batch"] == batch)), None)


def _target(name: str, goal: float, measured: float | None, why_not: str, **kwargs: Any) -> Target:
    return Target(name, goal, measured, note=why_not if measured is None else "", **kwargs)


def evaluate(result: dict[str, Any]) -> list[Target]:
    at64 = _config(result, 64, 128)
    targets: list[Target] = []
    if result["device"]["type"] == "cuda":
        loop = at64["loops"][DEFAULTS] if at64 else None
        targets.append(_target("GPU: hpcgan vs reference, 64px batch 128", 10.0,
                               loop["ratio_vs_reference"] if loop else None, "64px batch 128 not measured"))
        mfus = [loop["mfu"] for c in result["configs"] if c["resolution"] == 128 for loop in c["loops"].values()
                if loop["precision"] == "bf16" and loop.get("mfu") is not None]
        targets.append(_target("GPU: MFU in bf16 at 128px", 0.35, max(mfus, default=None),
                               "128px bf16 not measured, or no known peak (--peak-tflops bf16=...)", unit=""))
    else:
        fp32, bf16 = (_loop(at64, "fp32"), _loop(at64, "bf16")) if at64 else (None, None)
        no_bf16 = "this CPU has no native bf16 (AVX512-BF16/AMX)" if not result["device"]["bf16_native"] else ""
        targets.append(_target("CPU fp32: hpcgan vs reference, 64px batch 128", 1.3,
                               fp32["ratio_vs_reference"] if fp32 else None, "64px batch 128 not measured"))
        targets.append(_target("CPU bf16: hpcgan vs reference (fp32), 64px batch 128", 2.0,
                               bf16["ratio_vs_reference"] if bf16 else None, no_bf16 or "not measured"))
        for name, loop in (("fp32", fp32), ("bf16", bf16)):
            targets.append(_target(f"CPU {name}: training FLOP/s vs same-run {name} matmul", 0.9,
                                   loop.get("fraction_of_matmul_peak") if loop else None,
                                   no_bf16 if name == "bf16" and no_bf16 else "not measured", unit=""))
    demand = result.get("readers_demand_images_per_s")
    for name, rate in result.get("readers", {}).items():
        targets.append(_target(f"reader {name} vs trainer demand, {result['train']['resolution']}px", 5.0,
                               rate / demand, "no trainer demand measured"))
    interrupt = result.get("interrupt", {})
    targets.append(_target("interrupt: signal to exit with checkpoint", 2.0, interrupt.get("signal_to_exit_s"),
                           interrupt.get("skipped", "not measured"), at_least=False, unit=" s"))
    return targets


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(result: dict[str, Any], targets: list[Target]) -> str:
    dev = result["device"]
    lines = [f"hpcgan bench ({result['mode']}) on {dev['type']}: {dev['name']}, {dev['threads']} threads, "
             f"torch {result['versions']['torch']}, {result['date']}",
             f"load average {result['load_average_before']:.2f} before start, {result['load_average_after']:.2f} "
             f"at the end (with the bench's own), on {dev['cores']} cores"
             + (" (other processes were running: figures measured under load)" if result["under_load"] else ""),
             f"data: {result['data']}", ""]
    mm = result["matmul"]
    lines.append("matmul limit: " + ", ".join(f"{p} {m['tflops'] * 1e3:.1f} GFLOP/s ({m['size']}^3)"
                                               for p, m in mm.items()))
    lines += ["", "Training throughput: images/s, median of interleaved repeats (min-max), warm-up excluded; "
              "x reference: median of the per-repeat ratios (min-max)"]
    header = f"{'px':>4} {'batch':>5}  {'loop':<34} {'prec':<5} {'images/s':>22} {'x reference':>18} " \
             f"{'GFLOP/s':>8} {'% matmul':>8} {'MFU':>6}"
    lines.append(header)
    for config in result["configs"]:
        for name, loop in config["loops"].items():
            spread = f"{loop['images_per_s']:.1f} ({loop['min']:.1f}-{loop['max']:.1f})"
            ratio = f"{loop['ratio_vs_reference']:.2f} ({loop['ratio_min']:.2f}-{loop['ratio_max']:.2f})" \
                if "ratio_vs_reference" in loop else "-"
            lines.append(f"{config['resolution']:>4} {config['batch']:>5}  {name:<34} {loop['precision']:<5} "
                         f"{spread:>22} {ratio:>18} "
                         f"{loop['tflops'] * 1e3:>8.1f} {_fmt(loop.get('fraction_of_matmul_peak'), '.0%'):>8} "
                         f"{_fmt(loop.get('mfu'), '.1%'):>6}")
        lines.append(f"{'':>11} counted FLOPs per training image: hpcgan {config['flops_per_image'] / 1e9:.3f} GFLOP, "
                     f"reference {config['reference_flops_per_image'] / 1e9:.3f} GFLOP")
        warmups = [f"{name} {loop['warmup_s']:.1f} s" for name, loop in config["loops"].items()
                   if loop.get("warmup_s") is not None]
        if warmups:
            lines.append(f"{'':>11} untimed warm-up (torch.compile's compilation included): " + ", ".join(warmups))
    guard = result.get("guard", {})
    if "ratio" in guard:
        lines += ["", f"Divergence guard at {guard['resolution']}px batch {guard['batch']}: guard on / off "
                      f"{guard['ratio']:.3f} ({guard['min']:.3f}-{guard['max']:.3f}) per repeat; "
                      f"{guard['guard_on_images_per_s']:.1f} vs {guard['guard_off_images_per_s']:.1f} images/s"]
    if result.get("readers"):
        demand, res = result["readers_demand_images_per_s"], result["train"]["resolution"]
        lines += ["", f"Readers at {res}px (images/s; trainer demand {demand:.1f} images/s, fastest hpcgan loop)"]
        lines += [f"  {name:<12} {rate:>10.0f}  ({rate / demand:.0f}x demand)"
                  for name, rate in result["readers"].items()]
    lines += [f"  note: {n}" for n in result.get("reader_notes", [])]
    if "save_s" in result.get("checkpoint", {}):
        c = result["checkpoint"]
        lines += ["", f"Checkpoint: save {c['save_s']:.2f} s, restore {c['restore_s']:.2f} s, {c['mb']:.1f} MB"]
    if "signal_to_exit_s" in result.get("interrupt", {}):
        i = result["interrupt"]
        trials = ", ".join(f"{t['signal_to_exit_s']:.2f} s at {t['phase']:.0%}"
                           f"{' (step undone)' if t['step_undone'] else ''}" for t in i["trials"])
        lines.append(f"Interrupt: SIGUSR1 -> exit {i['exit_code']} with a complete checkpoint, worst "
                     f"{i['signal_to_exit_s']:.2f} s (signal at a fraction of a {i['step_s']:.2f} s step: {trials})")
    scaling = result.get("scaling", {})
    if "efficiency" in scaling:
        lines.append(f"Weak scaling, gloo, 1 thread per process, batch {scaling['batch_per_process']} per process: "
                     f"1 process {scaling['images_per_s_1']:.1f}, 2 processes {scaling['images_per_s_2']:.1f} "
                     f"images/s -> efficiency {scaling['efficiency']:.0%}")
        nodes = scaling.get("two_nodes", {})
        lines.append(f"  2 nodes ({', '.join(nodes['nodes'])}, 1 process each): {nodes['images_per_s']:.1f} images/s "
                     f"-> efficiency {nodes['efficiency']:.0%}" if "efficiency" in nodes
                     else f"  2 nodes: {nodes.get('skipped', 'not measured')}")
    elif scaling:
        lines.append(f"Scaling: {scaling.get('skipped') or scaling}")
    projection = result.get("projection")
    if projection:
        lines += ["", f"Projected data-parallel efficiency (no overlap; {projection['interconnect']['name']})"]
        for basis in projection["bases"]:
            rows = ", ".join(f"{r['gpus']} GPUs {r['efficiency']:.0%}" for r in basis["rows"])
            mb = sum(basis["grad_bytes"].values()) / 1e6
            lines.append(f"  {basis['basis']}: step {basis['step_s'] * 1e3:.1f} ms, {mb:.1f} MB all-reduced -> {rows}")
    lines += ["", "Targets"]
    lines += [f"  {t.name:<56} {_fmt(t.measured, ',.0f' if (t.measured or 0) >= 1000 else '.3g'):>7}  {t.verdict()}"
              for t in targets]
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)
