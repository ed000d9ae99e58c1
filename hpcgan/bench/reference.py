"""The reference: our re-implementation of the PyTorch examples' `dcgan/main.py` training loop.

hpcgan is measured against what DCGAN users run, so every per-iteration cost of that loop is kept: an
ImageFolder whose items are decoded by PIL and sent through Resize -> CenterCrop -> ToTensor ->
Normalize in DataLoader workers (2, shuffled, started afresh each epoch), default collation, fp32 nets
ending in Sigmoid, BCELoss against label tensors, the D step (real and fake backward separately) then
the G step, and `.item()` on every printed statistic, every iteration. torchvision is not needed: the
dataset and transforms below follow its semantics with PIL and numpy.

Left out, as outside the per-iteration path: image grids every 100 iterations and the per-epoch
`torch.save` of both nets. main.py's nets are fixed at 64x64; at larger sizes they grow like hpcgan's
(one block per doubling, widths capped at 8x), so both loops do the same arithmetic.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hpcgan.data.reader import DataError

# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
REAL_LABEL, FAKE_LABEL = 1, 0


# ---------------------------------------------------------------------------------------------- data

def resize(img: Image.Image, size: int) -> Image.Image:
    """transforms.Resize(size) on a PIL image: the shorter side becomes `size`, bilinear."""
    width, height = img.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    if (new_w, new_h) == (width, height):
        return img  # torchvision returns the image untouched when it already has the size
    return img.resize((new_w, new_h), Image.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """transforms.CenterCrop(size) for images at least `size` on both sides (true after `resize`)."""
    width, height = img.size
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """transforms.ToTensor: uint8 HWC -> float CHW in [0, 1]."""
    pixels = torch.from_numpy(np.array(img, np.uint8, copy=True))
    pixels = pixels.view(img.size[1], img.size[0], len(img.getbands())).permute(2, 0, 1).contiguous()
    return pixels.to(dtype=torch.get_default_dtype()).div(255)


def normalize(tensor: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """transforms.Normalize (not in place): (x - mean) / std per channel."""
    tensor = tensor.clone()
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=tensor.dtype).view(-1, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)


class ImageFolder(Dataset):
    """datasets.ImageFolder(root, transform=main.py's Compose): `root/<class>/**/<image>` -> (x, class)."""

    def __init__(self, root: str | Path, image_size: int, channels: int) -> None:
        root = Path(root)
        classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        self.samples: list[tuple[str, int]] = []
        for index, name in enumerate(classes):
            for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
                self.samples += [(os.path.join(folder, f), index) for f in sorted(files)
                                 if f.lower().endswith(IMG_EXTENSIONS)]
        if not self.samples:
            raise DataError(f"{root}: no images in class folders (ImageFolder expects ROOT/<class>/<image>)")
        self.image_size = image_size
        self.mode = "L" if channels == 1 else "RGB"
        self.stats = (0.5,) * channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        with open(path, "rb") as handle:  # torchvision's pil_loader
            img = Image.open(handle).convert(self.mode)
        img = center_crop(resize(img, self.image_size), self.image_size)
        return normalize(to_tensor(img), self.stats, self.stats), target


# ---------------------------------------------------------------------------------------------- nets

def feature_widths(image_size: int, base: int) -> list[int]:
    """Channels from the 4x4 end outwards: main.py's [8, 4, 2, 1] x base at 64, capped at 8x above."""
    levels = int(math.log2(image_size)) - 2
    return [base * min(2 ** (levels - 1 - i), 8) for i in range(levels)]


class ReferenceGenerator(nn.Module):
    def __init__(self, nz: int, ngf: int, nc: int, image_size: int) -> None:
        super().__init__()
        widths = feature_widths(image_size, ngf)
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, widths[0], 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU(True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


class ReferenceDiscriminator(nn.Module):
    def __init__(self, ndf: int, nc: int, image_size: int) -> None:
        super().__init__()
        widths = feature_widths(image_size, ndf)[::-1]
        layers: list[nn.Module] = [nn.Conv2d(nc, widths[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.LeakyReLU(0.2, inplace=True)]
        layers += [nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False), nn.Sigmoid()]
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).view(-1, 1).squeeze(1)


def weights_init(m: nn.Module) -> None:
    """main.py's init, matched on the class name as there."""
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------- loop

@dataclass(frozen=True)
class ReferenceStats:
    """One iteration's printed line: `Loss_D Loss_G D(x) D(G(z)) before / after`."""

    batch_size: int
    loss_d: float
    loss_g: float
    d_x: float
    d_g_z1: float
    d_g_z2: float

    def finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.loss_d, self.loss_g, self.d_x, self.d_g_z1, self.d_g_z2))


class ReferenceDCGAN:
    """main.py's setup with its defaults (nz 100, ngf/ndf 64, Adam lr 2e-4, betas (0.5, 0.999), 2 workers)."""

    def __init__(self, root: str | Path, *, image_size: int = 64, channels: int = 1, batch_size: int = 64,
                 nz: int = 100, ngf: int = 64, ndf: int = 64, lr: float = 2e-4, beta1: float = 0.5,
                 workers: int = 2, seed: int = 0, device: torch.device | str = "cpu") -> None:
        random.seed(seed)
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.nz = nz
        self.dataloader = DataLoader(ImageFolder(root, image_size, channels), batch_size=batch_size,
                                     shuffle=True, num_workers=workers)
        self.netG = ReferenceGenerator(nz, ngf, channels, image_size).to(self.device)
        self.netG.apply(weights_init)
        self.netD = ReferenceDiscriminator(ndf, channels, image_size).to(self.device)
        self.netD.apply(weights_init)
        self.criterion = nn.BCELoss()
        self.optimizerD = torch.optim.Adam(self.netD.parameters(), lr=lr, betas=(beta1, 0.999))
        self.optimizerG = torch.optim.Adam(self.netG.parameters(), lr=lr, betas=(beta1, 0.999))

    def iterations(self) -> Iterator[ReferenceStats]:
        """`for epoch ...: for i, data in enumerate(dataloader)`, for as long as the caller pulls."""
        while True:
            for data in self.dataloader:
                yield self.iteration(data[0])

    def iteration(self, batch: torch.Tensor) -> ReferenceStats:
        # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
        self.netD.zero_grad()
        real_cpu = batch.to(self.device)
        batch_size = real_cpu.size(0)
        label = torch.full((batch_size,), REAL_LABEL, dtype=real_cpu.dtype, device=self.device)
        output = self.netD(real_cpu)
        errD_real = self.criterion(output, label)
        errD_real.backward()
        D_x = output.mean().item()

        noise = torch.randn(batch_size, self.nz, 1, 1, device=self.device)
        fake = self.netG(noise)
        label.fill_(FAKE_LABEL)
        output = self.netD(fake.detach())
        errD_fake = self.criterion(output, label)
        errD_fake.backward()
        D_G_z1 = output.mean().item()
        errD = errD_real + errD_fake
        self.optimizerD.step()

        # (2) Update G network: maximize log(D(G(z)))
        self.netG.zero_grad()
        label.fill_(REAL_LABEL)
        output = self.netD(fake)
        errG = self.criterion(output, label)
        errG.backward()
        D_G_z2 = output.mean().item()
        self.optimizerG.step()
        return ReferenceStats(batch_size, errD.item(), errG.item(), D_x, D_G_z1, D_G_z2)
