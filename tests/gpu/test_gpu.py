"""Checks for the first GPU: every arch and resolution in bf16 and fp16 (finite losses, exact resume),
torch.compile, DALI GPU decoding and the CPU fallback, several processes on the GPU(s), preemption by
SIGTERM to the process group, and throughput / model FLOP utilisation. Run: bash tests/gpu/run.sh."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import assert_identical, cli_env, final_weights, free_port, hpcgan_cmd, make_trainer, write_image_folder

pytestmark = pytest.mark.gpu

# Real widths, small enough that 12 arch x resolution x precision runs fit in minutes.
ARCH_SETS = {"dcgan": ["model.ngf=32", "model.ndf=32"],
             "stylegan2": ["model.channel_base=4096", "model.channel_max=128", "model.w_dim=128",
                           "model.mapping_layers=2"]}
GPU = ["train.batch_size=16", "data.device_resident=true"]


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("gpu-data")
    # more images than one batch of 128 (the throughput test)
    return {res: write_image_folder(root / f"slices-{res}", n=256, size=res) for res in (64, 128, 256)}


def train(data: Path, out: Path, steps: int, *sets: str):
    trainer = make_trainer(data, out, *GPU, f"train.steps={steps}", *sets)
    assert trainer.device.type == "cuda", trainer.device
    assert trainer.fit() == 0
    return trainer


def losses(out: Path) -> list[float]:
    import json

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[k] for r in records if "loss_d" in r for k in ("loss_d", "loss_g")]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("res", [64, 128, 256])
@pytest.mark.parametrize("arch", ["dcgan", "stylegan2"])
def test_arch_resolution_precision_finite_and_resumes_exactly(arch, res, precision, folders, tmp_path, figures):
    sets = [f"model.arch={arch}", f"model.resolution={res}", f'train.mixed_precision="{precision}"',
            *ARCH_SETS[arch]]
    start = time.perf_counter()
    train(folders[res], tmp_path / "straight", 6, *sets)
    figures["seconds_6_steps"] = round(time.perf_counter() - start, 2)
    values = losses(tmp_path / "straight")
    figures["last_loss_d"], figures["last_loss_g"] = values[-2], values[-1]
    assert values and all(math.isfinite(v) for v in values), values
    train(folders[res], tmp_path / "split", 3, *sets)
    train(folders[res], tmp_path / "split", 6, *sets)
    assert_identical(final_weights(tmp_path / "split"), final_weights(tmp_path / "straight"))


@pytest.mark.parametrize("compile", [False, True])
def test_compile_on_and_off(compile, folders, tmp_path, figures):
    start = time.perf_counter()
    train(folders[64], tmp_path / "run", 8, 'train.mixed_precision="bf16"', f"train.compile={str(compile).lower()}",
          *ARCH_SETS["dcgan"])
    figures["seconds_8_steps"] = round(time.perf_counter() - start, 2)
    values = losses(tmp_path / "run")
    assert all(math.isfinite(v) for v in values), values


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    from data_factories import make_shards

    folder = tmp_path_factory.mktemp("gpu-shards") / "shards"
    make_shards(folder, n_train=96, n_val=16, sizes=(64,))
    return folder


@pytest.mark.parametrize("reader", ["dali", "webdataset"])
def test_shard_readers_on_gpu(reader, shards, tmp_path, figures):
    """DALI decodes on the GPU ("mixed"); webdataset is the CPU fallback where DALI is missing."""
    if reader == "dali":
        pytest.importorskip("nvidia.dali")
    trainer = train(shards, tmp_path / "run", 6, f"data.reader={reader}", 'train.mixed_precision="bf16"',
                    *ARCH_SETS["dcgan"])
    figures["reader"] = type(trainer.reader).__name__
    assert all(math.isfinite(v) for v in losses(tmp_path / "run"))


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_two_processes_on_the_gpus(backend, tmp_path, figures):
    """Two gloo processes sharing cuda:0; NCCL with a GPU each where two GPUs exist."""
    if backend == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("NCCL between two processes needs two GPUs")
    port, procs = free_port(), []
    for rank in range(2):
        local = str(rank) if backend == "nccl" else "0"
        procs.append(subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("two_process_worker.py")), str(tmp_path), backend],
            env={**cli_env(OMP_NUM_THREADS="1"), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": local,
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    start = time.perf_counter()
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    figures["seconds"] = round(time.perf_counter() - start, 2)
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)
    assert "ranks equal" in outputs[0], outputs[0][-2000:]


def test_sigterm_to_the_process_group_resumes_bit_exact(folders, tmp_path, figures):
    data, steps = folders[64], 40
    sets = [*GPU, 'train.mixed_precision="bf16"', *ARCH_SETS["dcgan"], f"train.steps={steps}", "checkpoint.every=1000"]
    args = ["--data", str(data), *[a for kv in ("track.enabled=false", "train.log_every=1", *sets)
                                   for a in ("--set", kv)]]
    straight = subprocess.run(hpcgan_cmd("train", "--out", str(tmp_path / "straight"), *args), env=cli_env(),
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(hpcgan_cmd("train", "--out", str(out), *args), env=cli_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 10):
        assert proc.poll() is None and time.time() < deadline, "training did not reach step 10"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)
    sent = time.perf_counter()
    _, err = proc.communicate(timeout=120)
    figures["seconds_signal_to_exit"] = round(time.perf_counter() - sent, 2)
    from hpcgan.train import EXIT_INTERRUPTED

    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    resumed = subprocess.run(hpcgan_cmd("train", "--out", str(out), *args), env=cli_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_identical(final_weights(out), final_weights(tmp_path / "straight"))


@pytest.mark.parametrize("arch,res,precision", [("dcgan", 64, "bf16"), ("dcgan", 64, "no"), ("stylegan2", 128, "bf16")])
def test_throughput_and_model_flop_utilisation(arch, res, precision, folders, tmp_path, figures):
    from hpcgan.bench.flops import flops_per_image, peak_tflops

    sets = [f"model.arch={arch}", f"model.resolution={res}", f'train.mixed_precision="{precision}"',
            "train.batch_size=128", "train.log_every=1000", "train.sample_every=100000", "model.ngf=64", "model.ndf=64"]
    trainer = make_trainer(folders[res], tmp_path / "run", *sets, "train.steps=1000", "data.device_resident=true")
    for _ in range(5):
        trainer.step()
    torch.cuda.synchronize()
    steps, start = 20, time.perf_counter()
    for _ in range(steps):
        trainer.step()
    torch.cuda.synchronize()
    images_per_s = steps * 128 / (time.perf_counter() - start)
    flops = flops_per_image(trainer.cfg, tmp_path / "flops")
    peak = peak_tflops(trainer.device, {}).get("bf16" if precision == "bf16" else "fp32")
    figures.update(images_per_s=round(images_per_s, 1), gflop_per_image=round(flops / 1e9, 3),
                   tflops=round(images_per_s * flops / 1e12, 2), peak_tflops=peak,
                   mfu=round(images_per_s * flops / 1e12 / peak, 4) if peak else None)
    assert images_per_s > 0
