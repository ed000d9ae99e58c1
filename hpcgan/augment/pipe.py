"""The augmentation every image D sees goes through, with its probability fixed or adapted (ADA).

On scarce data D memorises the training slices and its feedback to G turns to noise. Augmenting real
and fake images alike, with transforms that are differentiable so G learns through them, keeps D from
memorising; below p ~ 0.8 the augmentations do not leak into G's output (Karras et al. 2020). In `ada`
mode p follows D's overfitting: E[sign(D(real))] above the target means D is too sure of the reals,
and p rises. The pipe owns its RNG, so turning augmentation on does not change the latents or noise
the global RNG draws, and its state (p, RNG, accumulators) is a checkpoint part: resume is bit-exact.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist

from hpcgan.augment import ops
from hpcgan.config import AugmentConfig

MODES = ("off", "fixed", "ada")


def stream_seed(seed: int, rank: int) -> int:
    """The pipe's RNG seed: a hash, so it shares no arithmetic pattern with the seeds of other streams."""
    digest = hashlib.blake2b(f"hpcgan.augment:{seed}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class AugmentPipe:
    def __init__(self, cfg: AugmentConfig, *, seed: int, rank: int = 0, device: torch.device | str = "cpu") -> None:
        if cfg.mode not in MODES:
            raise ValueError(f"augment.mode={cfg.mode!r}: must be one of {', '.join(MODES)}")
        ops.check_ops(cfg.ops)
        self.cfg, self.device = cfg, torch.device(device)
        self.enabled = cfg.mode != "off"
        self.p = cfg.p
        self._ops = [op for op in ops.ALL_OPS if op in cfg.ops]
        self._gen = torch.Generator(self.device).manual_seed(stream_seed(seed, rank))
        self._signs = torch.zeros(2, device=self.device)  # sum of sign(D(real)), count; since the last adjust

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Augment a (N, C, H, W) batch on the pipe's device; float32 inside, the input's dtype and layout out.

        On the CPU the resampling is skipped when no image drew a geometric op; on an accelerator finding
        that out would cost a host sync, and skipping changes nothing: untouched images come through bit-exact."""
        if not self.enabled or self.p <= 0:
            return images
        x = images.float()
        n, _, h, w = x.shape
        geometric = ops.geometric_matrix(self._ops, self.p, n, h, w, self._gen)
        if geometric is not None:
            matrix, fired = geometric
            if x.device.type != "cpu" or fired.any():
                x = ops.warp(x, matrix)
        for op in self._ops:
            if op in ops.PIXEL_OPS:
                x = ops.PIXEL_OPS[op](x, self.p, self._gen)
        channels_last = images.is_contiguous(memory_format=torch.channels_last)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        return x.to(images.dtype).contiguous(memory_format=layout)

    def observe(self, real_logits: torch.Tensor) -> None:
        """ada: accumulate D's verdict on reals, on the device (no host sync)."""
        if self.cfg.mode == "ada":
            signs = real_logits.detach().float().sign()
            self._signs += torch.stack((signs.sum(), signs.new_full((), signs.numel())))

    def adjust(self, step: int, global_batch: int) -> float | None:
        """ada, every `interval` steps: move p one notch towards the target; returns r_t, the mean sign of
        D(real) since the last adjustment over all ranks, or None when p was not adjusted.

        A collective under torch.distributed: every rank must call it at the same steps. One host sync."""
        if self.cfg.mode != "ada" or step % self.cfg.interval:
            return None
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._signs)
        total, count = self._signs.tolist()
        self._signs.zero_()
        if count == 0:
            return None
        r_t = total / count
        direction = (r_t > self.cfg.target) - (r_t < self.cfg.target)
        notch = global_batch * self.cfg.interval / self.cfg.speed_images
        self.p = min(max(self.p + direction * notch, 0.0), 1.0)
        return r_t

    def state_dict(self) -> dict[str, Any]:
        """Copies, not views: a snapshot stays as it was while training goes on."""
        return {"p": self.p, "rng": self._gen.get_state(), "signs": self._signs.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rng = state["rng"]
        if rng.numel() != self._gen.get_state().numel():
            raise ValueError(f"augment state: its RNG state does not fit a {self.device.type} generator "
                             "(saved on another kind of device?)")
        self.p = float(state["p"])
        self._gen.set_state(rng)
        self._signs.copy_(state["signs"])
