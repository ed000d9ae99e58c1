"""Pure-PyTorch shard reader: DataLoader workers fetch and decode PNGs located through the index files.

Random access through the index lets this reader follow exactly the memory reader's epoch plan
(`epoch_plan`), so for the same seed the two serve identical batches, flips included, and the position
(epoch, batch) is the whole state. Workers decode whole batches; flips and the [-1, 1] conversion run
on the training device, as in the memory reader. For sets too large for memory on machines without
DALI.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hpcgan.data.memory import epoch_plan, to_unit_range
from hpcgan.data.shards import Split, decode_png
from hpcgan.data.source import DataError, rank_slice

_OPEN_SHARDS = 64  # files kept open per process; sets of thousands of shards must not exhaust descriptors


class _Batches(Dataset):
    """dataset[list of sample numbers] -> uint8 (B, 1, H, W), or the one-line error as a str.

    Errors travel as values: an exception raised in a worker would reach the trainer wrapped in a
    multi-line traceback instead of the one line that names the shard.
    """

    def __init__(self, split: Split) -> None:
        self.split = split
        self._files: dict[int, BinaryIO] = {}  # open shards, the most recently opened last

    def __getitem__(self, rows: list[int]) -> torch.Tensor | str:
        out = np.empty((len(rows), 1, self.split.size, self.split.size), dtype=np.uint8)
        for i, row in enumerate(rows):
            number, offset, length = (int(v) for v in self.split.refs[row])
            tar = self.split.tars[number]
            try:
                if number not in self._files:
                    if len(self._files) == _OPEN_SHARDS:
                        self._files.pop(next(iter(self._files))).close()
                    self._files[number] = open(tar, "rb", buffering=0)
                data = os.pread(self._files[number].fileno(), length, offset)
                if len(data) != length:
                    return f"{tar}: ends before byte {offset + length} (truncated?); re-run hpcgan prepare"
                out[i, 0] = decode_png(data, f"{tar} (byte {offset})", self.split.size)
            except DataError as err:
                return str(err)
            except OSError as err:
                return f"{tar}: cannot read ({err.strerror}); check the file system or re-run hpcgan prepare"
        return torch.from_numpy(out)

    def __getstate__(self) -> dict[str, Any]:
        return {"split": self.split, "_files": {}}  # open files do not cross processes


class _Plan:
    """The sampler: yields this rank's rows of the current epoch, one list per batch, from `start` on."""

    def __init__(self) -> None:
        self.rows: torch.Tensor = torch.empty(0, 0, dtype=torch.long)
        self.start = 0

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.rows[self.start:].tolist())

    def __len__(self) -> int:
        return max(0, len(self.rows) - self.start)


class WebDatasetSource:
    def __init__(self, split: Split, *, seed: int, global_batch: int, rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu", flip: bool = True, workers: int = 2) -> None:
        self.split = split
        self.num_images = split.num_images
        self.batches_per_epoch = self.num_images // global_batch
        if self.batches_per_epoch == 0:
            raise DataError(f"{split.shard_dir}: the {split.name} split has {self.num_images} images, fewer "
                            f"than one batch of train.batch_size={global_batch}: lower the batch size or add data")
        self.image_shape = (1, split.size, split.size)
        self.device = torch.device(device)
        self.seed, self.global_batch, self.flip = seed, global_batch, flip
        self.my_slice = rank_slice(global_batch, rank, world)
        self._plan = _Plan()
        # Workers live as long as one epoch's iterator (not persistent): dropping the iterator on an
        # error or a resume shuts them down at once, and starting them costs little next to an epoch.
        self._loader = DataLoader(_Batches(split), sampler=self._plan, batch_size=None, collate_fn=_first,
                                  num_workers=workers, pin_memory=self.device.type == "cuda")
        self._iter: Iterator[torch.Tensor | str] | None = None
        self.epoch, self.batch = 0, 0
        self._flips: torch.Tensor | None = None

    def _start(self) -> None:
        """Plan the current epoch and start fetching from the current batch."""
        rows, flips = epoch_plan(self.seed, self.epoch, self.num_images, self.global_batch, self.my_slice,
                                 self.flip)
        self._plan.rows, self._plan.start = rows, self.batch
        self._flips = None if flips is None else flips.to(self.device)
        self._iter = iter(self._loader)

    def next_batch(self) -> torch.Tensor:
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch, self._iter = self.epoch + 1, 0, None
        if self._iter is None:
            self._start()
        item = next(self._iter)
        if isinstance(item, str):
            self._iter = None
            raise DataError(item)
        x = to_unit_range(item.to(self.device, non_blocking=True),
                          None if self._flips is None else self._flips[self.batch])
        self.batch += 1
        return x

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch, self._iter = int(state["epoch"]), int(state["batch"]), None


def _first(items: Any) -> Any:
    """The dataset already returns a whole batch; nothing to collate."""
    return items
