"""Building what the loop drives: the Accelerator for this process, the optimizers, the wrapped G and D."""

from __future__ import annotations

import warnings
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs
from torch.nn.utils import parametrize

from hpcgan.config import Config, ConfigError
from hpcgan.train.devices import bind_cuda_device
from hpcgan.train.precision import mixed_precision_here


def make_accelerator(cfg: Config) -> tuple[Accelerator, str]:
    """This process's Accelerator and the resolved precision ("no" | "bf16" | "fp16")."""
    # broadcast_buffers=False: D runs on the real and the fake batch before one backward; buffer
    # broadcasts at the second forward would modify BatchNorm stats that autograd saved. Each rank
    # keeps its own running stats (unused by D in train mode); rank 0's go into checkpoints.
    # Newer torch renames the flag (forward_sync_buffers) but keeps this one's exact meaning.
    handlers = [DistributedDataParallelKwargs(broadcast_buffers=False),
                InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.dist_timeout_s))]
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    # Accelerate keeps mixed precision in a process-wide singleton; each Trainer sets its own
    # (the distributed state is kept), so fp32 and bf16 trainers can live in one process.
    AcceleratorState._reset_state(reset_partial_state=False)
    precision = mixed_precision_here(cfg.train.mixed_precision)
    bind_cuda_device()  # before Accelerate reads LOCAL_RANK: under per-task GPU binding it is not the index
    acc = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(), kwargs_handlers=handlers)
    if precision == "fp16" and acc.scaler is None:
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU (its loss scaler); "
                          "on CPU use train.mixed_precision=bf16")
    return acc, precision


def make_optimizers(cfg: Config, generator: torch.nn.Module,
                    discriminator: torch.nn.Module) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    tcfg = cfg.train
    fused = {"fused": True} if tcfg.fused_adam else {}
    # Lazy R1 takes D's penalty every r1_every steps; D's Adam is rescaled to match (as StyleGAN2 does).
    c = tcfg.r1_every / (tcfg.r1_every + 1) if tcfg.r1_gamma > 0 else 1.0
    opt_g = torch.optim.Adam(generator.parameters(), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), **fused)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=tcfg.lr * c,
                             betas=(tcfg.beta1 ** c, tcfg.beta2 ** c), **fused)
    return opt_g, opt_d


def prepare(acc: Accelerator, cfg: Config, generator: torch.nn.Module, discriminator: torch.nn.Module):
    """(G, D, opt_g, opt_d) as the loop drives them: memory format, DDP wrapping and compilation applied.
    The plain modules are converted in place and stay what checkpoints, EMA and samples use."""
    tcfg = cfg.train
    opt_g, opt_d = make_optimizers(cfg, generator, discriminator)
    if tcfg.channels_last:
        for module in (generator, discriminator):
            # A weight computed in the forward (spectral norm) in channels_last sends bf16 convolution
            # backward on CPU down a path ~40x slower (measured): such modules keep the default layout.
            if not any(parametrize.is_parametrized(m) for m in module.modules()):
                module.to(memory_format=torch.channels_last)
    G, D, opt_g, opt_d = acc.prepare(generator, discriminator, opt_g, opt_d)
    if acc.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if tcfg.compile:
        G, D = torch.compile(G, mode=tcfg.compile_mode), torch.compile(D, mode=tcfg.compile_mode)
    return G, D, opt_g, opt_d
