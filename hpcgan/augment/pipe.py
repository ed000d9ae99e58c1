"""The augmentation every image D sees goes through, with its probability fixed or adapted (ADA).

On scarce data D memorises the training slices and its feedback to G turns to noise. Augmenting real
and fake images alike, with transforms that are differentiable so G learns through them, keeps D from
memorising; below p ~ 0.8 the augmentations do not leak into G's output (Karras et al. 2020). In `ada`
mode p follows D's overfitting: E[sign(D(real))] above the target means D is too sure of the reals,
and p rises. The pipe owns its RNG, so turning augmentation on does not change the latents or noise
the global RNG draws, and its state (p, RNG, accumulators) is a checkpoint part: resume is bit-exact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from hpcgan.augment import ops
from hpcgan.config import AugmentConfig


class AugmentPipe:
    def __init__(self, cfg: AugmentConfig, *, seed: int, rank: int = 0, device: torch.device | str = "cpu") -> None:
        ops.check_ops(cfg.ops)
        self.cfg, self.device = cfg, torch.device(device)
        self.enabled = cfg.mode != "off"
        self.p = cfg.p
        self._gen = torch.Generator(self.device).manual_seed(seed * 1_000_003 + 104_729 * (rank + 1))
        self._signs = torch.zeros(2, device=self.device)  # sum of sign(D(real)), count

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.p <= 0:
            return images
        dtype, x = images.dtype, images.float()
        matrix = ops.geometric_matrix(self.cfg.ops, self.p, x.shape[0], x.shape[-1], self._gen, x.device)
        if matrix is not None:
            x = ops.resample(x, matrix)
        x = ops.intensity(x, self.cfg.ops, self.p, self._gen)
        if "cutout" in self.cfg.ops:
            x = ops.cutout(x, self.p, self._gen)
        return x.to(dtype)

    def observe(self, real_logits: torch.Tensor) -> None:
        """Accumulate D's verdict on reals, on the device (no host sync)."""
        if self.cfg.mode == "ada":
            self._signs += torch.stack([real_logits.detach().float().sign().sum(),
                                        torch.tensor(float(real_logits.numel()), device=self._signs.device)])

    def adjust(self, step: int, global_batch: int) -> float | None:
        """Every `interval` steps in ada mode: move p towards the target overfitting; returns r_t, the
        mean sign of D(real) over the interval and all ranks (one host sync per interval)."""
        if self.cfg.mode != "ada" or step % self.cfg.interval:
            return None
        signs = self._signs.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(signs)
        total, count = signs.tolist()
        self._signs.zero_()
        if count == 0:
            return None
        r_t = total / count
        step_size = global_batch * self.cfg.interval / self.cfg.speed_images
        self.p = min(max(self.p + (step_size if r_t > self.cfg.target else -step_size), 0.0), 1.0)
        return r_t

    def state_dict(self) -> dict[str, Any]:
        return {"p": self.p, "rng": self._gen.get_state(), "signs": self._signs.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.p = float(state["p"])
        self._gen.set_state(state["rng"])
        self._signs = state["signs"].to(self.device).clone()
