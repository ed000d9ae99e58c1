"""FLOPs of a training step, the matmul limit of this device, and peak figures for MFU.

FLOPs are counted, not estimated: `torch.utils.flop_counter` records every convolution and matmul of
one real `Trainer.step()` (G forward, three D forwards, both backwards), and of one reference iteration.
Each loop's FLOP/s uses its own count: the reference also computes D's weight gradients in the G step,
which it then discards, so it counts 2.44 GFLOP per 64px image where hpcgan counts 2.24. Convolution
FLOPs are linear in the batch, so a small batch gives the exact per-image figure cheaply.

A datasheet peak is unreachable on a CPU, so there the practical limit is what a large matmul reaches on
the same cores in the same run; on GPUs, MFU uses the datasheet peak (dense, no sparsity).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import default_collate
from torch.utils.flop_counter import FlopCounterMode

from hpcgan.bench.reference import ReferenceDCGAN
from hpcgan.config import Config, build_config, to_dict
from hpcgan.train import Trainer

# Dense TFLOP/s by device-name fragment (most specific first). "fp32" is the TF32 tensor-core figure:
# cuDNN runs fp32 convolutions in TF32 by default, so that is the peak an fp32 DCGAN can approach.
KNOWN_PEAKS: list[tuple[tuple[str, ...], dict[str, float]]] = [
    (("H100", "PCIe"), {"bf16": 756.0, "fp32": 378.0}),
    (("H100",), {"bf16": 989.4, "fp32": 494.7}),
    (("H200",), {"bf16": 989.4, "fp32": 494.7}),
    (("A100",), {"bf16": 312.0, "fp32": 156.0}),
    (("L40S",), {"bf16": 362.1, "fp32": 183.0}),
]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def peak_tflops(device: torch.device, overrides: dict[str, float]) -> dict[str, float]:
    """Datasheet peaks by precision for this device, replaced by --peak-tflops where given."""
    peaks: dict[str, float] = {}
    if device.type == "cuda":
        name = device_name(device)
        for fragments, table in KNOWN_PEAKS:
            if all(f in name for f in fragments):
                peaks = dict(table)
                break
    return {**peaks, **overrides}


def counted_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call of `step`, counted on its second call (the first creates lazy state)."""
    step()
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def flops_per_image(cfg: Config, run_dir: Path, batch: int = 4) -> float:
    """Counted FLOPs of one hpcgan training step, per real image, for `cfg`'s model."""
    small = build_config(base=to_dict(cfg), overrides=[f"train.batch_size={batch}", "train.compile=false",
                                                       'train.mixed_precision="no"'])
    return counted_flops(Trainer(small, run_dir).step) / batch


def reference_flops_per_image(reference: ReferenceDCGAN, batch: int = 4) -> float:
    """The same count for one reference iteration."""
    images, _ = default_collate([reference.dataloader.dataset[i] for i in range(batch)])
    return counted_flops(lambda: reference.iteration(images)) / batch


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 3) -> list[float]:
    """TFLOP/s of single `size`^3 matmuls, one figure per repeat, after one warm-up."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    results = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        results.append(2 * size**3 / (time.perf_counter() - start) / 1e12)
    return results


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
