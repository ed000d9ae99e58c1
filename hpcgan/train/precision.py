"""Which autocast precision a run uses: `train.mixed_precision=auto` decides per device.

On GPUs bf16 is the fast path with fp32-range exponents (no loss scaler needed); GPUs without bf16
(before Ampere) get fp16 with Accelerate's loss scaler. On CPU auto stays fp32: there the fast path must
reproduce the plain path's results, and bf16 is an explicit choice (2.4x on CPUs with AMX, measured in
docs/benchmarks.md; emulated and far slower elsewhere).
"""

from __future__ import annotations

import torch


def resolve_mixed_precision(requested: str, device_type: str, cuda_bf16: bool = False) -> str:
    """Accelerate's `mixed_precision` value ("no" | "bf16" | "fp16") for a configured one."""
    if requested != "auto":
        return requested
    if device_type != "cuda":
        return "no"
    return "bf16" if cuda_bf16 else "fp16"


def mixed_precision_here(requested: str) -> str:
    """`resolve_mixed_precision` for the device a Trainer in this process trains on."""
    if not torch.cuda.is_available():
        return resolve_mixed_precision(requested, "cpu")
    # Pre-Ampere GPUs "support" bf16 only by emulation, far slower than fp16: they get fp16.
    return resolve_mixed_precision(requested, "cuda", torch.cuda.is_bf16_supported(including_emulation=False))


def precision_name(mixed_precision: str) -> str:
    """How logs, tags and benchmark tables name a resolved precision: fp32, bf16 or fp16."""
    return "fp32" if mixed_precision == "no" else mixed_precision
