"""Which autocast precision a run uses: `train.mixed_precision=auto` decides per device.

On GPUs bf16 is the fast path with fp32-range exponents (no loss scaler needed); GPUs without bf16
(before Ampere) get fp16 with Accelerate's loss scaler. On CPU auto stays fp32: there the fast path must
reproduce the plain path's results, and bf16 is an explicit choice (3-4x the reference on CPUs with AMX,
measured in docs/benchmarks.md; emulated and far slower elsewhere).
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
    if not torch.cuda.is_available():
        return resolve_mixed_precision(requested, "cpu")
    return resolve_mixed_precision(requested, "cuda", native_bf16(torch.device("cuda")))


def precision_name(mixed_precision: str) -> str:
    """How logs, tags and benchmark tables name a resolved precision: fp32, bf16 or fp16."""
    return "fp32" if mixed_precision == "no" else mixed_precision
