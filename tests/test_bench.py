"""hpcgan bench: the fp32 fast path trains like the plain path, the reference loop trains on the same
pixels as hpcgan, and `hpcgan bench --quick` writes the JSON the issue's contract names."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from hpcgan.bench.images import bench_images
from hpcgan.bench.reference import ReferenceDCGAN, center_crop, resize
from hpcgan.config import build_config
from hpcgan.data import load_images
from hpcgan.train import Trainer

from conftest import TINY, run_cli

FP32 = 'train.mixed_precision="no"'


def weights_after(data, out, steps: int, *extra: str) -> dict[str, torch.Tensor]:
    trainer = Trainer(build_config(overrides=[f"data.path={data}", *TINY, FP32, *extra]), out)
    for _ in range(steps):
        trainer.step()
    nets = {"G": trainer.acc.unwrap_model(trainer.G), "D": trainer.acc.unwrap_model(trainer.D),
            "G_ema": trainer.ema.module}
    return {f"{name}.{key}": value.detach().clone() for name, net in nets.items()
            for key, value in net.state_dict().items()}


def test_fp32_fast_path_matches_plain_path_within_1e6(image_folder, tmp_path):
    plain = weights_after(image_folder, tmp_path / "plain", 4, "train.channels_last=false", "train.fused_adam=false")
    fast = weights_after(image_folder, tmp_path / "fast", 4, "train.channels_last=true", "train.fused_adam=true")
    assert plain.keys() == fast.keys()
    worst = max(float((plain[k].double() - fast[k].double()).abs().max()) for k in plain)
    assert worst <= 1e-6, f"fp32 fast path drifts {worst:.2e} from the plain path"


def test_resize_and_center_crop_follow_torchvision():
    img = Image.new("L", (80, 96))
    resized = resize(img, 64)
    assert resized.size == (64, 76)  # shorter side to 64, the other int(64 * 96 / 80)
    assert resize(resized.crop((0, 0, 64, 64)), 64).size == (64, 64)
    assert center_crop(resized, 64).size == (64, 64)


def test_reference_loop_trains_on_the_same_pixels_as_hpcgan(image_folder, tmp_path):
    images = bench_images(str(image_folder), 64, tmp_path)
    reference = ReferenceDCGAN(images.reference_root, image_size=64, channels=1, batch_size=8, ngf=8, ndf=8)
    first, label = reference.dataloader.dataset[0]
    ours = load_images(image_folder)[0].float() / 127.5 - 1
    assert first.shape == (1, 64, 64) and label == 0
    assert torch.allclose(first, ours, atol=1e-6)
    iterations = reference.iterations()
    try:
        stats = [next(iterations) for _ in range(7)]  # 48 images in batches of 8: crosses an epoch
    finally:
        iterations.close()
    assert all(s.finite() and s.batch_size == 8 for s in stats)
    assert all(0.0 < s.d_x < 1.0 for s in stats)


@pytest.mark.slow
def test_quick_bench_prints_ratios_and_writes_the_contract_json(image_folder, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "--quick", "--data", str(image_folder), "--batches", "8", "--steps", "1",
                   "--repeats", "1", "--set", "model.ngf=8", "--set", "model.ndf=8", "--json", str(out),
                   "--workdir", str(tmp_path / "work"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for dotted in ("train.ratio_vs_reference", "train.images_per_s", "reference.images_per_s",
                   "train.fraction_of_matmul_peak", "readers.memory", "checkpoint.save_s",
                   "interrupt.signal_to_exit_s", "device.name"):
        node = result
        for part in dotted.split("."):
            assert part in node, f"{dotted} missing from the --json output"
            node = node[part]
        assert node is not None and node != "", dotted
    assert result["interrupt"]["exit_code"] == 75
    assert result["train"]["ratio_vs_reference"] > 0
    assert "x ref" in proc.stdout and "Targets" in proc.stdout
