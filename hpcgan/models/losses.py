"""Non-saturating GAN losses on logits (BCE-with-logits written as softplus)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Losses never run in bf16/fp16 (autocast's logits), nor below the precision the nets run in."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(x) - log(1 - D(G(z))), the seed's BCE on real=1 / fake=0 labels."""
    return F.softplus(-_at_least_fp32(real_logits)).mean() + F.softplus(_at_least_fp32(fake_logits)).mean()


def g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(G(z)): the non-saturating generator loss."""
    return F.softplus(-_at_least_fp32(fake_logits)).mean()
