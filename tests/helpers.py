"""Shared test helpers: small real image sets, tiny-net configs, one trainer factory, running the real CLI.

Fixtures that use them live in conftest.py; tests import this module, never conftest."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# Narrow nets and small batches: the full-width DCGAN-64 costs ~2 s per batch-128 step on 2 cores.
# fp32, not auto: the same numerics on every CPU, bf16 or not; bf16 has tests of its own.
TINY = [
    "model.ngf=8", "model.ndf=8", "train.batch_size=8", 'train.mixed_precision="no"', "train.log_every=1",
    "train.sample_every=1000",
    "checkpoint.every=1000", "track.enabled=false", "track.log_model=false", "track.report=false",
    "metrics.every=0",
]


def write_image_folder(folder: Path, n: int = 48, size: int = 64, seed: int = 0) -> Path:
    """Blurry blobs on black, like skull-stripped slices: enough structure for a GAN to chase."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size] / size
    for i in range(n):
        cy, cx, r = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.2, 0.35)
        img = np.clip(1.2 - np.hypot(yy - cy, xx - cx) / r, 0, 1) * rng.uniform(0.6, 1.0)
        img += rng.normal(0, 0.03, img.shape)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"slice_{i:04d}.png")
    return folder


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def hpcgan_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hpcgan", *args]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(hpcgan_cmd(*args), cwd=cwd, env=cli_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """G, D and EMA tensors of the run's latest checkpoint, flattened into one dict."""
    from hpcgan.train.checkpoint import CheckpointManager, load_torch

    latest = CheckpointManager(run_dir / "checkpoints", keep=1).latest()
    assert latest is not None, f"no complete checkpoint in {run_dir}"
    weights = load_torch(latest / "model.pt")
    return {f"{net}.{k}": v for net, sd in weights.items() if sd for k, v in sd.items()}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def sinfo_unreachable() -> str | None:
    """None if a controller answers sinfo, else why not."""
    if shutil.which("sinfo") is None:
        return "sinfo not installed; start the local cluster: slurm/local/start.sh"
    # sinfo retries for ~9 s when nothing listens: probe the controller's port first.
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    text = conf.read_text(errors="replace") if conf.is_file() else ""
    host = re.search(r"^\s*SlurmctldHost=([^\s(#]+)(?:\(([^)\s]+)\))?", text, re.M | re.I)
    port = re.search(r"^\s*SlurmctldPort=(\d+)", text, re.M | re.I)
    if host:
        addr = (host.group(2) or host.group(1), int(port.group(1)) if port else 6817)
        try:
            socket.create_connection(addr, timeout=2).close()
        except OSError as e:
            return f"no slurmctld at {addr[0]}:{addr[1]} ({e}); start it: slurm/local/start.sh"
    try:
        proc = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=15)
    except (subprocess.SubprocessError, OSError) as e:
        return f"sinfo failed ({e}); start the local cluster: slurm/local/start.sh"
    if proc.returncode != 0:
        return f"no SLURM controller answers sinfo ({proc.stderr.strip()}); start it: slurm/local/start.sh"
    return None


def make_trainer(data, out, *extra: str):
    """A Trainer on `data` with the tiny nets of TINY, plus `extra` overrides."""
    from hpcgan.config import build_config
    from hpcgan.train import Trainer

    return Trainer(build_config(overrides=[f"data.path={data}", *TINY, *extra]), out)


def train_args(data, out, *extra: str) -> list[str]:
    """`hpcgan train` arguments with the tiny nets of TINY, plus `extra` overrides."""
    return ["train", "--data", str(data), "--out", str(out), *[a for kv in [*TINY, *extra] for a in ("--set", kv)]]


def free_port() -> int:
    """A free TCP port on loopback, for a torch.distributed rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`torch.distributed.run` with `nproc` local processes of one thread each, rendezvous on loopback."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *args]
    return subprocess.run(cmd, env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=timeout)


def ddp_report(out: Path, steps: int, *sets: str) -> list[dict]:
    """tests/ddp_worker.py on 2 processes for `steps` steps: per step and net, whether all ranks hold equal weights."""
    out.mkdir(parents=True, exist_ok=True)
    proc = torchrun(2, str(REPO / "tests" / "ddp_worker.py"), str(out), str(steps), *sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "ddp_report.json").read_text())
