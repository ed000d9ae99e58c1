"""Augmentation of what D sees: differentiable, black-filling, reproducible from its state, adaptive."""

from __future__ import annotations

import io

import pytest
import torch

from hpcgan.augment import ALL_OPS, AugmentPipe
from hpcgan.config import AugmentConfig


def pipe(**kw) -> AugmentPipe:
    return AugmentPipe(AugmentConfig(**{"mode": "fixed", "p": 1.0, **kw}), seed=0)


def square(n: int = 4, size: int = 32) -> torch.Tensor:
    """Black everywhere but a bright centred square: like a skull-stripped slice."""
    x = torch.full((n, 1, size, size), -1.0)
    x[:, :, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 0.8
    return x


def test_off_and_zero_probability_are_the_identity():
    x = square()
    assert pipe(mode="off")(x) is x and pipe(p=0.0)(x) is x


@pytest.mark.parametrize("op", ALL_OPS)
def test_each_op_changes_images_keeps_shape_and_passes_gradients(op):
    x = square().requires_grad_(True)
    y = pipe(ops=[op])(x)
    assert y.shape == x.shape and y.dtype == x.dtype and not torch.equal(y.detach(), x.detach())
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_flip_is_exact_and_translation_moves_a_pixel_by_whole_pixels():
    x = torch.rand(4, 1, 32, 32) * 2 - 1  # asymmetric: a flip shows
    assert torch.allclose(pipe(ops=["flip"])(x), x.flip(-1), atol=1e-6)
    dot = torch.full((8, 1, 32, 32), -1.0)
    dot[:, :, 16, 16] = 1.0
    moved = pipe(ops=["translate"])(dot)
    peaks = moved.flatten(1).argmax(dim=1)
    assert torch.allclose(moved.flatten(1).max(dim=1).values, torch.ones(8), atol=1e-5)
    assert (peaks != 16 * 32 + 16).any()


@pytest.mark.parametrize("op", ["translate", "rotate", "scale", "aniso", "cutout"])
def test_what_is_filled_in_is_black(op):
    x = square(n=16)
    y = pipe(ops=[op])(x)
    corners = torch.stack([y[..., 0, 0], y[..., 0, -1], y[..., -1, 0], y[..., -1, -1]])
    assert torch.allclose(corners, torch.full_like(corners, -1.0), atol=1e-5)


def test_state_round_trip_reproduces_the_stream_bit_exactly():
    first = pipe(p=0.5, mode="ada")
    first(square(8))
    first.observe(torch.randn(8))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = pipe(p=0.5, mode="ada", )
    second.load_state_dict(torch.load(buffer, weights_only=True))
    x = square(8)
    assert torch.equal(first(x), second(x)) and first.p == second.p
    assert first.adjust(4, 8) == second.adjust(4, 8) and first.p == second.p


def test_adaptive_probability_follows_the_sign_of_d_on_reals():
    ada = pipe(mode="ada", p=0.5, interval=2, speed_images=80)
    for step in (1, 2):
        ada.observe(torch.ones(8))
        r_t = ada.adjust(step, 8)
    assert r_t == 1.0 and ada.p == pytest.approx(0.5 + 8 * 2 / 80)
    for step in range(3, 23):
        ada.observe(-torch.ones(8))
        ada.adjust(step, 8)
    assert ada.p == 0.0
    fixed = pipe(p=0.3)
    fixed.observe(torch.ones(8))
    assert fixed.adjust(4, 8) is None and fixed.p == 0.3


def test_unknown_op_is_refused_by_name():
    with pytest.raises(ValueError, match="augment.ops: unknown warp"):
        pipe(ops=["flip", "warp"])


def test_bf16_in_bf16_out():
    assert pipe(p=0.5)(square().bfloat16()).dtype == torch.bfloat16
