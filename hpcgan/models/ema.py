"""Exponential moving average of the generator's weights: what samples, metrics and exports use.

The average is a frozen copy of G that trails its weights; BatchNorm buffers are copied, not averaged.
The decay is either fixed per step or derived from a half-life in images (StyleGAN's convention),
which keeps the averaging horizon the same when the batch size changes.
"""

from __future__ import annotations

import copy

import torch


def ema_decay(decay: float, half_life_images: int, batch_size: int) -> float:
    """The per-step decay: `decay`, or with a half-life the one under which a weight's contribution
    halves after `half_life_images` images."""
    return 0.5 ** (batch_size / half_life_images) if half_life_images else decay


class EMA:
    def __init__(self, generator: torch.nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(generator).eval().requires_grad_(False)
        self.decay = decay
        self._src_params = list(generator.parameters())
        self._src_buffers = list(generator.buffers())
        self._params = list(self.module.parameters())
        self._buffers = list(self.module.buffers())

    @torch.no_grad()
    def update(self, step: int) -> None:
        # Ramp the decay up so early, noisy weights fade quickly.
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self._params, self._src_params, 1.0 - decay)
        torch._foreach_copy_(self._buffers, self._src_buffers)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
