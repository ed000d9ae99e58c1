"""The in-memory reader: the whole uint8 set (and its labels) lives on the training device; no worker processes.

Shuffling, flips and the uint8 -> [-1, 1] conversion run on the device, so the host does nothing per
step. Order and flips of an epoch come from `epoch_generator(seed, epoch)`, and rank r takes slice r of
each global batch: the position (epoch, batch) is the whole state, and it means the same on any number
of processes.
"""

from __future__ import annotations

from typing import Any

import torch

from hpcgan.data.pixels import to_unit
from hpcgan.data.reader import Batch, DataError, batches_per_epoch, epoch_generator, rank_slice


def epoch_plan(seed: int, epoch: int, num_images: int, global_batch: int, my_slice: slice,
               flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This epoch's sample indices and flips for one rank, one row per global batch."""
    gen = epoch_generator(seed, epoch)
    order = torch.randperm(num_images, generator=gen)
    flips = torch.rand(num_images, generator=gen) < 0.5 if flip else None
    batches = num_images // global_batch
    rows = order[:batches * global_batch].view(batches, global_batch)[:, my_slice]
    return rows, None if flips is None else flips[rows]


def to_unit_range(x: torch.Tensor, flips: torch.Tensor | None) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [-1, 1], mirrored left-right where `flips` is set."""
    x = to_unit(x)
    if flips is not None:
        x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
    return x


class MemoryReader:
    world_invariant = True

    def __init__(self, images: torch.Tensor, *, seed: int, global_batch: int, rank: int = 0,
                 world: int = 1, device: torch.device | str = "cpu", flip: bool = True,
                 device_resident: bool = True, labels: torch.Tensor | None = None,
                 classes: tuple[str, ...] = ()) -> None:
        """`labels`: int64 (N,) class indices into `classes`; None: every image is class 0."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(f"memory reader expects uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels is not None and (labels.dtype != torch.int64 or tuple(labels.shape) != images.shape[:1]):
            raise DataError(f"memory reader expects int64 labels of shape ({images.shape[0]},), got "
                            f"{labels.dtype} {tuple(labels.shape)}")
        self.num_images = images.shape[0]
        self.classes = classes
        self.batches_per_epoch = batches_per_epoch(self.num_images, global_batch, "the training set")
        self.image_shape = tuple(images.shape[1:])
        self.device = torch.device(device)
        self.images = images.to(self.device) if device_resident else images
        self.labels = (torch.zeros(self.num_images, dtype=torch.int64) if labels is None else labels) \
            .to(self.images.device)
        # A batch gathered on the host is fresh pageable memory whatever the set's own: it is pinned
        # itself, so that its non-blocking copy overlaps the GPU's work.
        self._pin_batches = not device_resident and self.device.type == "cuda"
        self.seed, self.global_batch, self.flip = seed, global_batch, flip
        self.my_slice = rank_slice(global_batch, rank, world)
        self.epoch, self.batch = 0, 0
        self._plan()

    def _plan(self) -> None:
        self._indices, self._flips = epoch_plan(self.seed, self.epoch, self.num_images, self.global_batch,
                                                self.my_slice, self.flip)
        self._indices = self._indices.to(self.images.device)
        self._flips = None if self._flips is None else self._flips.to(self.device)

    def next_batch(self) -> Batch:
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
            self._plan()
        rows = self._indices[self.batch]
        x, y = self.images[rows], self.labels[rows]
        if self._pin_batches:
            x, y = x.pin_memory(), y.pin_memory()
        flips = None if self._flips is None else self._flips[self.batch]
        x = to_unit_range(x.to(self.device, non_blocking=True), flips)
        self.batch += 1
        return Batch(x, y.to(self.device, non_blocking=True))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._plan()
