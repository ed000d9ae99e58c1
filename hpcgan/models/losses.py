"""GAN losses on logits (autocast-safe: no sigmoid + BCE), and the R1 gradient penalty.

`logistic` is the non-saturating loss of the original GAN (BCE on real=1 / fake=0 labels, written as
softplus); `hinge` is the margin loss of SN-GAN and BigGAN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("logistic", "hinge")


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Losses never run in bf16/fp16 (autocast's logits), nor below the precision the nets run in."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "logistic") -> torch.Tensor:
    real, fake = _at_least_fp32(real_logits), _at_least_fp32(fake_logits)
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()  # -log D(x) - log(1 - D(G(z)))


def g_loss(fake_logits: torch.Tensor, kind: str = "logistic") -> torch.Tensor:
    fake = _at_least_fp32(fake_logits)
    if kind == "hinge":
        return -fake.mean()
    return F.softplus(-fake).mean()  # -log D(G(z)): the non-saturating generator loss


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor, loss_scale: float = 1.0) -> torch.Tensor:
    """Mean over the batch of ||dD(x)/dx||^2 on real images (Mescheder et al. 2018), kept differentiable
    for D's update (double backward). `real` must require grad and be what D's graph started from;
    `loss_scale` is the fp16 loss scaler's factor, taken out again before squaring."""
    (grad,) = torch.autograd.grad(real_logits.float().sum() * loss_scale, real, create_graph=True)
    grad = grad.float() / loss_scale
    return grad.square().sum(dim=[1, 2, 3]).mean()
