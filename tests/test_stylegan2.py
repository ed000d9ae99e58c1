"""StyleGAN2 G and D: what the trainer, DDP, autocast, EMA and checkpoints rely on, at tiny widths."""

from __future__ import annotations

import copy
import dataclasses
import io
import time

import pytest
import torch
import torch.nn.functional as F

from hpcgan.config import ModelConfig
from hpcgan.models import build_models
from hpcgan.models.stylegan2 import Generator, ModulatedConv, minibatch_stddev, widths

TINY = ModelConfig(arch="stylegan2", nz=32, channel_base=256, channel_max=16, w_dim=32, mapping_layers=2)


def tiny(**changes) -> ModelConfig:
    return dataclasses.replace(TINY, **changes)


def built(cfg: ModelConfig = TINY, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    return build_models(cfg)


@pytest.mark.parametrize("resolution", [64, 128, 256])
def test_shapes_at_every_resolution(resolution):
    G, D = built(tiny(resolution=resolution))
    assert len(G.layers) == 2 * len(widths(tiny(resolution=resolution))) - 1
    images = G(torch.randn(3, 32))
    assert images.shape == (3, 1, resolution, resolution) and images.dtype == torch.float32
    for n in (3, 8):
        assert D(torch.randn(n, 1, resolution, resolution)).shape == (n,)


@pytest.mark.parametrize("n, group", [(8, 4), (6, 3), (3, 3), (5, 1), (2, 2)])
def test_minibatch_stddev_groups_the_largest_divisor_up_to_four(n, group):
    x = torch.randn(n, 2, 4, 4)
    extra = minibatch_stddev(x)[:, -1]
    assert extra.shape == (n, 4, 4)
    members = x.view(group, n // group, 2, 4, 4)
    expected = (members.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3)).repeat(group)
    torch.testing.assert_close(extra[:, 0, 0], expected)
    assert torch.equal(extra, extra[:, :1, :1].expand(n, 4, 4))


def test_upsampling_layer_is_bilinear_upsampling_then_the_convolution():
    torch.manual_seed(0)
    conv = ModulatedConv(6, 5, 16, up=True)
    x, w = torch.randn(2, 6, 8, 8), torch.randn(2, 16)
    bias = torch.randn(5)
    styles = conv.affine(w)
    weight = conv.weight
    reference = F.conv2d(F.interpolate(x * styles[:, :, None, None], scale_factor=2, mode="bilinear"),
                         weight.flip(2, 3), padding=1)
    demod = (styles.square() @ weight.square().sum(dim=(2, 3)).t() + 1e-8).rsqrt()
    reference = reference * demod[:, :, None, None] + bias[:, None, None]
    out = conv(x, w, bias)
    assert out.shape == (2, 5, 16, 16)
    # Equal away from the border, where bilinear replicates the edge and the filter pads with zeros.
    torch.testing.assert_close(out[..., 2:-2, 2:-2], reference[..., 2:-2, 2:-2], rtol=1e-4, atol=1e-5)


def test_demodulation_restores_unit_variance():
    torch.manual_seed(0)
    conv = ModulatedConv(64, 8, 16)
    out = conv(torch.randn(4, 64, 16, 16), 3 * torch.randn(4, 16), torch.zeros(8))
    assert 0.8 < out.std(dim=(2, 3)).mean() < 1.2


def test_bf16_autocast_and_channels_last_forward_backward():
    G, D = built()
    G.to(memory_format=torch.channels_last)
    D.to(memory_format=torch.channels_last)
    style_dtypes = []
    G.layers[1].conv.affine.register_forward_hook(lambda m, i, out: style_dtypes.append(out.dtype))
    real = torch.randn(4, 1, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fake = G(torch.randn(4, 32))
        loss = F.softplus(D(fake)).mean() + F.softplus(-D(real)).mean()
    loss.backward()
    assert fake.dtype == torch.float32 and torch.isfinite(fake).all()
    assert style_dtypes == [torch.float32]  # styles (and the demodulation) stay float32 under autocast
    for name, p in [*G.named_parameters(), *D.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_autocast_output_is_close_to_float32():
    G, _ = built()
    G.eval()
    z = torch.randn(4, 32)
    torch.manual_seed(1)
    full = G(z)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = G(z)
    assert (half - full).abs().mean() < 0.05 * full.abs().mean()


@pytest.mark.parametrize("mixing", [0.0, 1.0])
def test_every_parameter_gets_a_gradient_in_one_step(mixing):
    G, D = built(tiny(style_mixing=mixing))
    fake = G(torch.randn(4, 32))
    F.softplus(-D(fake)).mean().backward()
    for name, p in G.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    D.zero_grad(set_to_none=True)
    (F.softplus(D(fake.detach())).mean() + F.softplus(-D(torch.randn(4, 1, 64, 64))).mean()).backward()
    for name, p in D.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_style_mixing_only_in_training():
    G, _ = built(tiny(style_mixing=1.0))
    z = torch.randn(4, 32)
    ws = G.styles(z)
    assert ws.shape == (4, G.num_styles, 32)
    assert not torch.equal(ws[:, 0], ws[:, -1])  # the second latent always owns the last style
    assert torch.equal(ws[:, 0], G.mapping(z))
    G.eval()
    ws = G.styles(z)
    assert torch.equal(ws, G.mapping(z).unsqueeze(1).expand_as(ws))
    G, _ = built(tiny(style_mixing=0.0))
    ws = G.styles(z)
    assert torch.equal(ws, ws[:, :1].expand_as(ws))


def test_w_avg_follows_the_first_latent_in_training_only():
    G, _ = built(tiny(style_mixing=1.0))
    z = torch.randn(6, 32)
    G(z)
    torch.testing.assert_close(G.mapping.w_avg, 0.005 * G.mapping(z).mean(dim=0))
    G.eval()
    before = G.mapping.w_avg.clone()
    G(torch.randn(6, 32))
    assert torch.equal(G.mapping.w_avg, before)


def test_truncation_to_the_average_gives_one_image():
    G, _ = built()
    for _ in range(3):
        G(torch.randn(8, 32))  # move w_avg away from zero
    G.eval()
    with torch.no_grad():
        for layer in G.layers:
            layer.noise_strength.fill_(0.0)
    images = G(torch.randn(5, 32), truncation_psi=0.0)
    assert images.std(dim=0).max() < 1e-5
    assert images.std() > 0
    assert G(torch.randn(5, 32)).std(dim=0).max() > 1e-3  # psi = 1: the latents still matter


@pytest.mark.parametrize("autocast", [False, True])
def test_r1_double_backward(autocast):
    _, D = built()
    D.to(memory_format=torch.channels_last)
    x = torch.randn(4, 1, 64, 64).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = D(x)
    (g,) = torch.autograd.grad(logits.float().sum(), x, create_graph=True)
    g.square().sum().backward()
    for name, p in D.named_parameters():
        if name != "out.bias":  # the logit's offset does not change its gradient w.r.t. the input
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert D.conv.weight.grad.abs().sum() > 0


def test_same_seed_same_weights_and_outputs_and_deepcopy():
    (G1, D1), (G2, D2) = built(seed=3), built(seed=3)
    for a, b in ((G1, G2), (D1, D2)):
        state_a, state_b = a.state_dict(), b.state_dict()
        assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    ema = copy.deepcopy(G1)
    z = torch.randn(4, 32)
    outputs = []
    for g in (G1, G2, ema):
        torch.manual_seed(7)  # noise and style mixing draw from the global RNG
        outputs.append(g(z))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    assert not torch.equal(built(seed=4)[0].const, G1.const)


def test_state_dict_round_trips_through_weights_only_load():
    G, D = built(seed=0)
    G(torch.randn(4, 32))  # a non-zero w_avg
    for module, fresh in zip((G, D), built(seed=1)):
        buffer = io.BytesIO()
        torch.save(module.state_dict(), buffer)
        buffer.seek(0)
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        module.eval(), fresh.eval()
        x = torch.randn(4, 32) if isinstance(module, Generator) else torch.randn(4, 1, 64, 64)
        torch.manual_seed(5)
        a = module(x)
        torch.manual_seed(5)
        assert torch.equal(a, fresh(x))


@pytest.mark.slow
def test_cpu_quickstart_widths_step(capsys):
    """One step at the CPU quickstart widths, batch 32 at 64 px, as the trainer runs it on CPU (float32,
    channels_last). The time is printed, not asserted."""
    cfg = ModelConfig(arch="stylegan2", resolution=64, channel_base=4096, channel_max=128, w_dim=128, mapping_layers=2)
    G, D = built(cfg)
    G.to(memory_format=torch.channels_last)
    D.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    F.softplus(-D(G(torch.randn(32, cfg.nz)))).mean().backward()
    seconds = time.perf_counter() - start
    assert all(p.grad is not None for p in G.parameters())
    with capsys.disabled():
        print(f"\nstylegan2 64 px, widths 4096/128, batch 32: forward+backward {seconds:.2f} s "
              f"on {torch.get_num_threads()} threads")


def _grown(clamp, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """G and D as a long run can leave them: styles in the thousands (the affines' biases) and D's
    convolution weights 30x their initial scale."""
    from hpcgan.models.stylegan2 import Discriminator

    torch.manual_seed(seed)
    G, D = Generator(TINY, fp16_clamp=clamp), Discriminator(TINY, fp16_clamp=clamp)
    with torch.no_grad():
        for layer in G.layers:
            layer.conv.affine.bias.fill_(1e4)
        for name, p in D.named_parameters():
            if name.endswith("weight") and p.dim() == 4:
                p.mul_(30)
    return G, D


def _fp16_passes(G: torch.nn.Module, D: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """G's images and D's logits on real-like images, each with a backward, under CPU fp16 autocast:
    (outputs, every gradient). Overflowing gradients are the loss scaler's to catch, not the clamp's."""
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.float16):
        images, logits = G(torch.randn(4, 32)), D(torch.randn(4, 1, 64, 64))
    (images.float().square().mean() + logits.float().sum()).backward()
    return [images, logits], [p.grad for p in (*G.parameters(), *D.parameters()) if p.grad is not None]


def test_fp16_clamp_and_prenormalisation_keep_a_grown_model_finite():
    """The same grown G and D in fp16: without the clamp and pre-normalisation both forwards overflow to
    inf/NaN; with them images, logits and every gradient stay finite."""
    outputs, _ = _fp16_passes(*_grown(clamp=None))
    assert not any(out.isfinite().all() for out in outputs)
    G, D = _grown(clamp=256.0)
    outputs, grads = _fp16_passes(G, D)
    assert outputs[1].dtype == torch.float16 and all(out.isfinite().all() for out in outputs)
    assert len(grads) == len([*G.parameters(), *D.parameters()])
    assert all(g.isfinite().all() for g in grads)


def test_fp16_guards_leave_fp32_and_bf16_untouched():
    """Clamping and pre-normalisation act only in fp16: fp32 and bf16 outputs are bit-identical to
    a model without them, even where activations exceed the clamp."""
    for dtype in (None, torch.bfloat16):
        outputs = []
        for clamp in (None, 256.0):
            G, D = _grown(clamp)
            torch.manual_seed(1)
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                outputs.append((G(torch.randn(4, 32)), D(torch.randn(4, 1, 64, 64))))
        assert all(torch.equal(a, b) for a, b in zip(*outputs)), dtype
        assert outputs[0][0].abs().max() > 256 or outputs[0][1].abs().max() > 256


def test_fp16_prenormalisation_changes_only_rounding():
    """At its initial scale a G in fp16 with and without the guards gives the same images up to fp16
    rounding: pre-normalised scales are divided out again by demodulation."""
    images = []
    for clamp in (None, 256.0):
        torch.manual_seed(0)
        G = Generator(TINY, fp16_clamp=clamp)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.float16):
            images.append(G(torch.randn(4, 32)))
    assert not torch.equal(images[0], images[1])
    torch.testing.assert_close(images[0], images[1], rtol=0.02, atol=0.02)
