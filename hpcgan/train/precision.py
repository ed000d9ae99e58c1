"""Which autocast precision a run uses: `train.mixed_precision=auto` decides per device.

bf16 where the hardware computes it natively: GPUs from Ampere on, and CPUs with AVX512-BF16 or AMX,
where bf16 trains about 3x the images per second of fp32 and learns as much per step (the SWD-per-step
curves of both, same seed, are in docs/training.md). GPUs without bf16 get fp16 with Accelerate's loss
scaler; other CPUs stay fp32, since emulated bf16 is far slower than fp32 there.
"""

from __future__ import annotations

import torch


def resolve_mixed_precision(requested: str, device_type: str, bf16_native: bool = False) -> str:
    """Accelerate's `mixed_precision` value ("no" | "bf16" | "fp16") for a configured one."""
    if requested != "auto":
        return requested
    if bf16_native:
        return "bf16"
    return "fp16" if device_type == "cuda" else "no"


def native_bf16(device: torch.device) -> bool:
    """bf16 math in hardware (Ampere+ GPUs; AVX512-BF16/AMX CPUs). Elsewhere it is emulated: pre-Ampere
    GPUs report bf16 support only by emulation, and emulated bf16 is far slower than fp16 or fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def mixed_precision_here(requested: str) -> str:
    """`resolve_mixed_precision` for the device a Trainer in this process trains on."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return resolve_mixed_precision(requested, device.type, requested == "auto" and native_bf16(device))


def precision_name(mixed_precision: str) -> str:
    """How logs, tags and benchmark tables name a resolved precision: fp32, bf16 or fp16."""
    return "fp32" if mixed_precision == "no" else mixed_precision
