"""Streaming shard reader: `webdataset.WebDataset` over the tar shards, in `torch.utils.data.DataLoader` workers.

An epoch is one deterministic stream of samples, a function of (seed, epoch) only:

1. the shard files in the order `randperm(shards, epoch_generator(seed, epoch))` (DALI's shard order);
2. each shard's samples in their written order (`prepare` shuffled them when it wrote the shards),
   read sequentially by `webdataset.WebDataset(..., shardshuffle=False)`;
3. a `webdataset` shuffle buffer of `shuffle_buffer` (1024) samples, seeded from the same generator;
4. the first `batches_per_epoch * global_batch` samples cut into global batches; rank r takes slice r
   of every global batch, as with the memory reader; the rest of the stream is dropped;
5. flips: one coin per position of that stream, from the same generator, applied on the training
   device with the [-1, 1] conversion.

A sample's class is its `cls` member, read with its PNG (labelled shard folders only).

Every rank and every worker reads the same stream (bytes only: a sample's PNG is decoded by the one
worker whose batch holds it, and only on the rank whose share it is). Worker w of n handles batches
w, w + n, ...; the DataLoader returns workers' items round robin, so batches come in order and the
order does not depend on the number of workers or ranks. The position (epoch, batch) is the whole
state, on any number of processes: a resumed epoch replays the stream and skips (without decoding) the
batches already served.
"""

from __future__ import annotations

import atexit
import multiprocessing
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hpcgan.data.memory import to_unit_range
from hpcgan.data.shards import Split, class_index, decode_png, png_key
from hpcgan.data.reader import (Batch, DataError, WorkerLost, batches_per_epoch, epoch_generator,
                                ignore_preemption_signals, quiet_worker_deaths, rank_slice)

SHUFFLE_BUFFER = 1024  # samples; as DALI's reader

# Worker processes started by any reader. They ignore SIGTERM (`ignore_preemption_signals`), so
# multiprocessing's exit hook, which terminates daemonic children with SIGTERM and then joins them, would
# wait forever for any still running: an iterator that was never shut down (one kept alive by an
# exception's traceback, or left in an uncollected reference cycle after its reader was freed) still
# has its workers. At exit they are killed, whether or not their reader still exists.
_workers: weakref.WeakSet[multiprocessing.process.BaseProcess] = weakref.WeakSet()


@atexit.register  # registered after multiprocessing's and torch's exit hooks, so it runs before them
def _kill_workers() -> None:
    for worker in list(_workers):
        if worker.is_alive():
            worker.kill()
            worker.join(5)


def epoch_order(seed: int, epoch: int, num_shards: int, num_used: int,
                flip: bool) -> tuple[list[int], int, torch.Tensor | None]:
    """One epoch's shard order, shuffle-buffer seed and flips (one per position of the epoch's stream)."""
    gen = epoch_generator(seed, epoch)
    shard_order = torch.randperm(num_shards, generator=gen).tolist()
    shuffle_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    flips = torch.rand(num_used, generator=gen) < 0.5 if flip else None
    return shard_order, shuffle_seed, flips


class _Failed(Exception):
    """A one-line reason that names the shard; raised through webdataset's stages unchanged."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _first_line(exn: BaseException) -> str:
    text = str(exn.args[0]) if exn.args else ""
    text = text.split(" @ ")[0].strip()  # webdataset appends " @ <stream repr>"
    return f"{type(exn).__name__}: {text.splitlines()[0]}" if text else type(exn).__name__


class _EpochStream(IterableDataset):
    """Yields (batch number, uint8 (B, 1, H, W), int64 (B,) labels) for this rank's share of the epoch's
    batches from `start` on, or the one-line error as a str.

    Errors travel as values: an exception raised in a worker would reach the trainer wrapped in a
    multi-line traceback instead of the one line that names the shard. The main process sets
    `shard_order`, `shuffle_seed` and `start` before each epoch's `iter(loader)`.
    """

    def __init__(self, split: Split, global_batch: int, my_slice: slice, batches: int, buffer: int) -> None:
        self.split, self.ext = split, png_key(split.size)
        self.global_batch, self.my_slice, self.batches, self.buffer = global_batch, my_slice, batches, buffer
        counts = np.bincount(split.refs[:, 0], minlength=len(split.tars)) if len(split.refs) else []
        self.expected = {str(tar): int(n) for tar, n in zip(split.tars, counts)}
        self.shard_order: list[int] = []
        self.shuffle_seed, self.start = 0, 0

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor] | str]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        try:
            yield from self._batches(worker, workers)
        except _Failed as err:
            yield err.message
        except DataError as err:
            yield str(err)

    def _batches(self, worker: int, workers: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        first = self.start + worker  # this worker's batches: first, first + workers, ... < self.batches
        if first >= self.batches:
            return
        last = first + (self.batches - 1 - first) // workers * workers
        urls = [str(self.split.tars[i]) for i in self.shard_order]
        samples = wds.WebDataset(urls, handler=self._handler(urls), shardshuffle=False, nodesplitter=None,
                                 workersplitter=None, empty_check=False, seed=0)
        samples = samples.compose(self._complete(urls)).shuffle(self.buffer, initial=self.buffer,
                                                                seed=self.shuffle_seed)
        size, batch, (lo, hi) = self.split.size, self.global_batch, (self.my_slice.start, self.my_slice.stop)
        n_classes = len(self.split.classes)
        mine: list[dict[str, Any]] = []
        for position, sample in enumerate(samples):
            number, j = divmod(position, batch)
            if number > last:
                break
            if number < first or (number - first) % workers:
                continue
            if lo <= j < hi:
                mine.append(sample)
            if j == batch - 1:
                out = np.empty((len(mine), 1, size, size), dtype=np.uint8)
                labels = np.zeros(len(mine), dtype=np.int64)
                for i, s in enumerate(mine):
                    where = f"{s['__url__']} (sample {s['__key__']})"
                    out[i, 0] = decode_png(s[self.ext], where, size)
                    if n_classes:
                        labels[i] = class_index(s["cls"], n_classes, where)
                mine = []
                yield number, torch.from_numpy(out), torch.from_numpy(labels)

    def _handler(self, urls: list[str]) -> Any:
        """webdataset's error handler: turn any failure into one line naming the shard, and stop."""
        split = self.split

        def handle(exn: Exception) -> bool:
            if isinstance(exn, _Failed):
                raise exn
            text = " ".join(str(a) for a in exn.args)
            where = next((u for u in urls if u in text), None) or getattr(exn, "filename", None) \
                or f"a {split.name} shard in {split.shard_dir}"
            raise _Failed(f"{where}: cannot read it ({_first_line(exn)}): truncated or damaged? "
                          "re-run hpcgan prepare")

        return handle

    def _complete(self, urls: list[str]) -> Any:
        """A pipeline stage: each sample has the wanted PNG (and its class, when labelled) and each shard as
        many samples as its index."""
        ext, expected, labelled = self.ext, self.expected, bool(self.split.classes)

        def stage(src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
            shard, seen = -1, 0

            def finish(upto: int) -> None:  # shards before `upto` are done: each must be complete
                for k in range(max(shard, 0), upto):
                    got = seen if k == shard else 0
                    if got != expected[urls[k]]:
                        raise _Failed(f"{urls[k]}: holds {got} samples, its index {expected[urls[k]]} "
                                      "(truncated?); re-run hpcgan prepare")

            for sample in src:
                url = sample["__url__"]
                if shard < 0 or url != urls[shard]:
                    now = urls.index(url, shard + 1) if url in urls[shard + 1:] else len(urls)
                    finish(now)
                    shard, seen = now, 0
                for member in (ext, "cls") if labelled else (ext,):
                    if member not in sample:
                        raise _Failed(f"{url}: sample {sample['__key__']} has no {member}; re-run hpcgan prepare")
                seen += 1
                yield sample
            finish(len(urls))

        return stage


class WebDatasetReader:
    world_invariant = True

    def __init__(self, split: Split, *, seed: int, global_batch: int, rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu", flip: bool = True, workers: int = 2,
                 shuffle_buffer: int = SHUFFLE_BUFFER) -> None:
        self.split = split
        self.num_images = split.num_images
        self.batches_per_epoch = batches_per_epoch(self.num_images, global_batch,
                                                   f"{split.shard_dir}: the {split.name} split")
        self.image_shape = (1, split.size, split.size)
        self.classes = split.classes
        self.device = torch.device(device)
        self.seed, self.global_batch, self.flip = seed, global_batch, flip
        self.my_slice = rank_slice(global_batch, rank, world)
        self._stream = _EpochStream(split, global_batch, self.my_slice, self.batches_per_epoch,
                                    max(1, min(shuffle_buffer, self.num_images)))
        # Workers live as long as one epoch's iterator (not persistent): dropping the iterator on an
        # error or a resume shuts them down at once, and starting them costs little next to an epoch.
        # Its own generator: each iter() draws a base seed, which must not come from the global RNG that
        # the trainer's noise comes from, or a run resumed mid-epoch would draw different noise.
        self._loader = DataLoader(self._stream, batch_size=None, collate_fn=_first, num_workers=workers,
                                  pin_memory=self.device.type == "cuda", generator=torch.Generator(),
                                  worker_init_fn=ignore_preemption_signals if workers else None)
        self._iter: Iterator[tuple[int, torch.Tensor, torch.Tensor] | str] | None = None
        self.epoch, self.batch = 0, 0
        self._flips: torch.Tensor | None = None

    def _start(self) -> None:
        """Order the current epoch and start streaming from the current batch."""
        used = self.batches_per_epoch * self.global_batch
        order, shuffle_seed, flips = epoch_order(self.seed, self.epoch, len(self.split.tars), used, self.flip)
        self._stream.shard_order, self._stream.shuffle_seed, self._stream.start = order, shuffle_seed, self.batch
        self._flips = None if flips is None else \
            flips.view(self.batches_per_epoch, self.global_batch)[:, self.my_slice].to(self.device)
        before = set(multiprocessing.active_children())
        self._iter = iter(self._loader)
        _workers.update(set(multiprocessing.active_children()) - before)
        quiet_worker_deaths()

    def next_batch(self) -> Batch:
        """The next batch; `WorkerLost` (position unchanged; the next call starts new workers) when a worker
        process died."""
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch, self._iter = self.epoch + 1, 0, None
        if self._iter is None:
            self._start()
        try:
            item = next(self._iter, None)
        except (RuntimeError, ConnectionError, EOFError) as err:
            # A worker killed while it hands over a batch breaks the pipe (reset, EOF) instead of being
            # reported by the DataLoader: both mean the same.
            if isinstance(err, RuntimeError) and "DataLoader worker" not in str(err):
                raise
            self._iter = None
            raise WorkerLost(f"{self.split.shard_dir}: a data worker died before batch {self.batch} of epoch "
                             f"{self.epoch} ({err})") from None
        if isinstance(item, str) or item is None or item[0] != self.batch:
            self._iter = None
            raise DataError(item if isinstance(item, str) else
                            f"{self.split.shard_dir}: the {self.split.name} shards ended before batch "
                            f"{self.batch} of epoch {self.epoch}; re-run hpcgan prepare")
        x = to_unit_range(item[1].to(self.device, non_blocking=True),
                          None if self._flips is None else self._flips[self.batch])
        self.batch += 1
        return Batch(x, item[2].to(self.device, non_blocking=True))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch, self._iter = int(state["epoch"]), int(state["batch"]), None


def _first(items: Any) -> Any:
    """The dataset already yields whole batches; nothing to collate."""
    return items
