"""NVIDIA DALI reader: `fn.readers.webdataset` on the shards, decode on the GPU ("mixed") when training
on one and on the CPU otherwise, random flip and [-1, 1] normalisation inside the pipeline. In a
labelled shard folder the reader also returns each sample's `cls` member (decimal text, parsed on the
host); unlabelled folders (older shards) are read without it.

One pipeline per rank and epoch (`shard_id=rank`, `num_shards=world`). Each epoch lists the shard files
in a seeded order, the same on every rank, and rank r streams the samples [N*r//world, N*(r+1)//world)
of that list through a shuffle buffer: over epochs every rank sees all the data, never twice in one
epoch. Every rank serves `batches_per_epoch` = N // global_batch batches, then the pipeline is
replaced, so epochs are exact and all ranks take the same number of steps.

The state is (epoch, batch) plus this rank's DALI checkpoint, which covers the batches returned so far
(not the ones DALI prefetched). A state without a checkpoint for this rank and process count (the
trainer may save rank 0's state only) is restored by rebuilding the epoch's pipeline, seeded by
(seed, epoch, rank), and replaying the epoch's first `batch` batches when the next batch is asked for:
exact, at the cost of at most one epoch of decoding.

An epoch's order depends on the number of processes (each rank streams its own part of the shard
list), so on another process count a position keeps the epoch and the number of batches served, but the
rest of that epoch is cut differently: until it ends, samples may repeat or be skipped. From the next
epoch on, every sample is again seen once per epoch.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import numpy as np
import torch

from hpcgan.data.shards import Split, class_index, png_key
from hpcgan.data.reader import Batch, DataError, batches_per_epoch, epoch_generator, rank_slice


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class DaliReader:
    world_invariant = False

    def __init__(self, split: Split, *, seed: int, global_batch: int, rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu", flip: bool = True, workers: int = 2,
                 shuffle_buffer: int = 1024) -> None:
        self.split = split
        self.num_images = split.num_images
        self.batches_per_epoch = batches_per_epoch(self.num_images, global_batch,
                                                   f"{split.shard_dir}: the {split.name} split")
        self.image_shape = (1, split.size, split.size)
        self.classes = split.classes
        self.device = torch.device(device)
        share = rank_slice(global_batch, rank, world)
        self.seed, self.rank, self.world, self.flip = seed, rank, world, flip
        self._per_rank, self._threads = share.stop - share.start, max(1, workers)
        self._buffer = max(1, min(shuffle_buffer, self.num_images // world))
        self.epoch, self.batch = 0, 0
        self._pipe: Any = self._build(None)  # None: rebuild and replay to `batch` at the next batch

    def _build(self, checkpoint: bytes | None) -> Any:
        """This rank's pipeline for the current epoch, fresh or restored from a checkpoint."""
        from nvidia.dali import fn, pipeline_def, types

        order = torch.randperm(len(self.split.tars), generator=epoch_generator(self.seed, self.epoch)).tolist()
        seed = int(hashlib.sha256(f"{self.seed}/{self.epoch}/{self.rank}".encode()).hexdigest()[:7], 16)
        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if gpu else None

        @pipeline_def(batch_size=self._per_rank, num_threads=self._threads, device_id=device_id, seed=seed,
                      enable_checkpointing=True)
        def pipeline() -> Any:
            members = fn.readers.webdataset(
                paths=[str(self.split.tars[i]) for i in order],
                index_paths=[str(self.split.indexes[i]) for i in order],
                ext=[png_key(self.split.size)] + (["cls"] if self.classes else []),
                missing_component_behavior="error", shard_id=self.rank, num_shards=self.world,
                random_shuffle=True, initial_fill=self._buffer, name="reader")
            png, *cls = members if self.classes else (members,)  # one extension: one node, not a list
            images = fn.decoders.image(png, device="mixed" if gpu else "cpu", output_type=types.GRAY)
            mirror = fn.random.coin_flip(probability=0.5) if self.flip else 0
            return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                            mean=[127.5], std=[127.5], mirror=mirror), *cls

        try:
            pipe = pipeline(checkpoint=checkpoint) if checkpoint is not None else pipeline()
            pipe.build()
        except RuntimeError as err:
            raise DataError(f"{self.split.shard_dir}: DALI cannot read the {self.split.name} shards "
                            f"({_first_line(err)}); re-run hpcgan prepare") from None
        return pipe

    def _run(self) -> tuple[Any, ...]:
        """The pipeline's next outputs: the images, and with classes their `cls` members."""
        try:
            return self._pipe.run()
        except RuntimeError as err:
            raise DataError(f"{self.split.shard_dir}: DALI failed reading the {self.split.name} shards "
                            f"({_first_line(err)}); re-run hpcgan prepare") from None

    def _labels(self, outputs: tuple[Any, ...]) -> torch.Tensor:
        if not self.classes:
            return torch.zeros(self._per_rank, dtype=torch.int64)
        members = outputs[1]
        where = f"{self.split.shard_dir}: a {self.split.name} shard"
        return torch.tensor([class_index(np.asarray(members[i]).tobytes(), len(self.classes), where)
                             for i in range(len(members))], dtype=torch.int64)

    def next_batch(self) -> Batch:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
            self._pipe = self._build(None)
        elif self._pipe is None:
            self._pipe = self._build(None)
            for _ in range(self.batch):
                self._run()
        outputs = self._run()
        tensor = outputs[0].as_tensor()
        x = torch.empty(tensor.shape(), dtype=torch.float32,
                        device=self.device if self.device.type == "cuda" else "cpu")
        feed_ndarray(tensor, x, cuda_stream=torch.cuda.current_stream(x.device) if x.is_cuda else None)
        self.batch += 1
        labels = self._labels(outputs).to(self.device, non_blocking=True)
        return Batch(x.to(self.device, non_blocking=True), labels)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "batch": self.batch}
        if self._pipe is not None:
            checkpoint = base64.b64encode(self._pipe.checkpoint()).decode("ascii")
            state["dali"] = {"rank": self.rank, "world": self.world, "checkpoint": checkpoint}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Exact at once from this rank's own checkpoint; otherwise replayed lazily, so that a second load
        before the next batch (the trainer's, after a change of process count) costs nothing."""
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        saved = state.get("dali") or {}
        own = saved.get("rank") == self.rank and saved.get("world") == self.world
        self._pipe = self._build(base64.b64decode(saved["checkpoint"])) if own else None
