"""Augmentation of what D sees: differentiable, black-filling, exact where it can be, reproducible from its
state, independent of the global RNG, adaptive."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hpcgan.augment import ALL_OPS, AugmentPipe
from hpcgan.augment.ops import GEOMETRIC
from hpcgan.config import AugmentConfig, ModelConfig
from hpcgan.models.dcgan import Discriminator

PLACED = ["translate", "rotate", "scale", "aniso", "rot90"]  # geometric ops that can move content off-centre


def pipe(seed: int = 0, rank: int = 0, **kw) -> AugmentPipe:
    return AugmentPipe(AugmentConfig(**{"mode": "fixed", "p": 1.0, **kw}), seed=seed, rank=rank)


def square(n: int = 16, size: int = 32) -> torch.Tensor:
    """Black everywhere but a bright centred square: like a skull-stripped slice."""
    x = torch.full((n, 1, size, size), -1.0)
    x[:, :, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 0.8
    return x


def noisy(n: int = 4, c: int = 1, size: int = 32, seed: int = 0) -> torch.Tensor:
    """No symmetry a flip or a quarter turn could hide behind, and values with every mantissa bit in use."""
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed)).tanh()


def test_off_and_zero_probability_are_the_identity():
    x = noisy()
    assert pipe(mode="off")(x) is x and pipe(p=0.0)(x) is x and pipe(mode="ada", p=0.0)(x) is x


@pytest.mark.parametrize("op", ALL_OPS)
def test_each_op_changes_images_keeps_shape_and_passes_finite_gradients(op):
    x = noisy().requires_grad_(True)
    y = pipe(ops=[op])(x)
    assert y.shape == x.shape and y.dtype == x.dtype and not torch.equal(y.detach(), x.detach())
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("op", [*GEOMETRIC, "cutout"])
def test_geometric_ops_and_cutout_stay_in_range(op):
    y = pipe(ops=[op])(noisy(n=16))
    assert y.min() >= -1 and y.max() <= 1


@pytest.mark.parametrize("op", PLACED)
def test_what_comes_in_from_outside_is_black(op):
    y = pipe(ops=[op])(square())
    inner = torch.zeros(32, 32, dtype=torch.bool)
    inner[2:-2, 2:-2] = True
    border = y[..., ~inner]  # a ring two pixels wide
    assert torch.allclose(border, torch.full_like(border, -1.0), atol=1e-6)
    black = pipe(ops=[op])(torch.full((16, 1, 32, 32), -1.0))
    assert torch.allclose(black, torch.full_like(black, -1.0), atol=1e-6)


def test_cutout_is_a_black_square_of_half_the_size():
    y = pipe(ops=["cutout"])(torch.ones(64, 1, 32, 32))
    holes = (y == -1).flatten(1).sum(1)
    assert ((y == -1) | (y == 1)).all() and holes.max() == 16 * 16 and holes.min() > 0


def test_flip_and_quarter_turns_are_exact():
    x = noisy(n=8, size=64)  # F.affine_grid is off by ~1e-5 px here
    assert torch.equal(pipe(ops=["flip"])(x), x.flip(-1))
    turned = pipe(ops=["rot90"])(x)
    for image, out in zip(x, turned):
        assert any(torch.equal(out, image.rot90(k, dims=(-2, -1))) for k in range(4))


def test_translation_moves_a_pixel_by_whole_pixels_exactly():
    size, n = 64, 32
    dot = torch.full((n, 1, size, size), -1.0)
    dot[:, :, 30, 33] = 1.0
    moved = pipe(ops=["translate"])(dot)
    shifts = []
    for out in moved:
        (y, x), = (out[0] == 1.0).nonzero().tolist()
        expected = torch.full_like(out, -1.0)
        expected[0, y, x] = 1.0
        assert torch.equal(out, expected)  # one pixel, moved whole: nothing blurred
        shifts.append((y - 30, x - 33))
    assert all(abs(dy) <= size // 8 and abs(dx) <= size // 8 for dy, dx in shifts)
    assert len(set(shifts)) > n // 2


def test_images_no_op_fired_in_come_through_bit_identical():
    x, p = noisy(n=256), 0.05
    same = (pipe(p=p)(x) == x).flatten(1).all(1).sum().item()  # default ops: the resampling runs
    untouched = len(x) * (1 - p) ** 8  # images no default op fired in: ~169
    assert untouched - 40 < same < untouched + 40


def test_state_round_trip_continues_the_stream_bit_exactly():
    first = pipe(p=0.5, mode="ada", interval=3)
    first(noisy(8))
    first.observe(torch.randn(8))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = pipe(seed=1, p=0.1, mode="ada", interval=3)  # another seed: only the loaded state can agree
    second.load_state_dict(torch.load(buffer, weights_only=True))
    for step in (1, 2, 3):
        x = noisy(8, seed=step)
        assert torch.equal(first(x), second(x)) and first.p == second.p
        logits = torch.randn(8, generator=torch.Generator().manual_seed(step))
        first.observe(logits)
        second.observe(logits)
        assert first.adjust(step, 8) == second.adjust(step, 8) and first.p == second.p


def test_state_dict_is_a_snapshot_not_a_view():
    ada = pipe(mode="ada")
    state = ada.state_dict()
    rng, signs = state["rng"].clone(), state["signs"].clone()
    ada(noisy())
    ada.observe(torch.ones(8))
    assert torch.equal(state["rng"], rng) and torch.equal(state["signs"], signs)


def test_the_global_rng_is_left_alone_and_ranks_augment_differently():
    x = noisy(8)
    torch.manual_seed(0)
    expected = torch.randn(4)
    torch.manual_seed(0)
    pipe(p=0.5)(x)
    assert torch.equal(torch.randn(4), expected)
    assert torch.equal(pipe(p=0.5)(x), pipe(p=0.5)(x))
    assert not torch.equal(pipe(p=0.5)(x), pipe(p=0.5, rank=1)(x))
    assert not torch.equal(pipe(p=0.5)(x), pipe(p=0.5, seed=1)(x))


def test_adaptive_probability_follows_the_sign_of_d_on_reals():
    ada = pipe(mode="ada", p=0.5, interval=2, speed_images=80)
    ada.observe(torch.ones(8))
    assert ada.adjust(1, 8) is None and ada.p == 0.5  # not an adjustment step
    ada.observe(torch.ones(8))
    assert ada.adjust(2, 8) == 1.0 and ada.p == pytest.approx(0.5 + 8 * 2 / 80)
    ada.observe(torch.tensor([1.0] * 8 + [-1.0] * 2))  # mean sign 0.6, the target: p stays
    assert ada.adjust(4, 8) == pytest.approx(0.6) and ada.p == pytest.approx(0.7)
    for step in range(6, 40, 2):
        ada.observe(-torch.ones(8))
        ada.adjust(step, 8)
    assert ada.p == 0.0
    fixed = pipe(p=0.3)
    fixed.observe(torch.ones(8))
    assert fixed.adjust(4, 8) is None and fixed.p == 0.3


def _rank(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        ada = pipe(mode="ada", p=0.5, interval=1, speed_images=160, rank=rank)
        ada.observe(torch.ones(8) if rank == 0 else -torch.ones(24))  # together: mean sign -0.5
        r_t = ada.adjust(1, 32)
        torch.save({"r_t": r_t, "p": ada.p, "images": ada(noisy(8))}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes
def test_ranks_adjust_p_together_and_augment_differently(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert first["r_t"] == second["r_t"] == -0.5 and first["p"] == second["p"] == pytest.approx(0.5 - 32 / 160)
    assert not torch.equal(first["images"], second["images"])


def test_unknown_op_is_refused_by_name():
    with pytest.raises(ValueError, match=r"augment\.ops: unknown 'warp'.*allowed: flip, rot90"):
        pipe(ops=["flip", "warp"])


def test_bf16_autocast_and_channels_last():
    x = noisy(c=3)
    assert pipe(p=0.5)(x.bfloat16()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = pipe(p=0.5)(x)
    assert torch.equal(under_autocast, pipe(p=0.5)(x))  # computed in float32 regardless
    out = pipe(p=0.5)(x.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, pipe(p=0.5)(x))


def test_cost_against_a_discriminator_forward():
    """Printed, not asserted: the pipe at p=0.5 with the default ops vs DCGAN-64's D forward."""
    x = noisy(n=64, size=64)
    augment, discriminator = pipe(p=0.5), Discriminator(ModelConfig()).eval()

    def best_of(fn, reps: int = 3) -> float:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.no_grad():
        t_aug, t_d = best_of(lambda: augment(x)), best_of(lambda: discriminator(x))
    print(f"\naugment p=0.5 default ops (64,1,64,64): {t_aug * 1e3:.2f} ms; "
          f"DCGAN-64 D forward: {t_d * 1e3:.2f} ms ({torch.get_num_threads()} threads)")
