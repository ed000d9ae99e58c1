"""FastGAN's two parts that no other arch has: skip-layer excitation in G and D's self-supervised decoders."""

from __future__ import annotations

import torch

from hpcgan.config import ModelConfig
from hpcgan.models import build_models
from helpers import make_trainer


def _nets(resolution: int = 64):
    torch.manual_seed(0)
    return build_models(ModelConfig(arch="fastgan", resolution=resolution, ngf=8, ndf=8, nz=16))


def test_excitation_gates_fine_levels_from_coarse_ones():
    G, _ = _nets(128)
    assert sorted(G.excite) == ["128", "32", "64"]  # each gated by the level eight times coarser
    G(torch.randn(4, 16)).square().mean().backward()
    for gate in G.excite.values():
        assert gate.gate[1].weight.grad.abs().sum() > 0  # the coarse map steers the output through the gate


def test_decoders_learn_to_redraw_real_images():
    _, D = _nets()
    grid = torch.linspace(-1, 1, 64)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    centres = torch.rand(8, 2, 1, 1) - 0.5
    real = torch.exp(-((xx - centres[:, :1]) ** 2 + (yy - centres[:, 1:]) ** 2) / 0.1) * 2 - 1  # bright blobs
    decoders = [p for name, p in D.named_parameters() if name.startswith("decode")]
    opt = torch.optim.Adam(D.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        logits, loss = D(real, reconstruct=True)
        assert logits.shape == (8,)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in decoders)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0], losses


def test_the_loop_trains_the_decoders_on_real_images(image_folder, tmp_path):
    trainer = make_trainer(image_folder, tmp_path / "run", "model.arch=fastgan", "train.steps=2")
    before = {k: v.clone() for k, v in trainer.discriminator.state_dict().items() if k.startswith("decode")}
    assert trainer.fit() == 0
    after = trainer.discriminator.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("original"))
