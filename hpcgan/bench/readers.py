"""Every data reader's images/s on its own, to set next to what the trainer consumes.

A reader is timed through the `Reader` the trainer uses (batches on the training device, flips and
[-1, 1] included) after a warm-up that starts its workers. Measured alone it has all cores, so the
margin over the trainer's demand must be wide (the target is 5x) to hold while training shares them.
"""

from __future__ import annotations

import time

import torch

from hpcgan.bench.flops import sync
from hpcgan.bench.images import BenchImages
from hpcgan.config import DataConfig
from hpcgan.data import build_reader, dali_available


def reader_plan(images: BenchImages, device: torch.device) -> tuple[dict[str, tuple[str, torch.device]], list[str]]:
    """Readers to time (name -> (data.reader, device)) and a note for each one skipped."""
    plan = {"memory": ("memory", device)}
    notes = []
    if not images.shards:
        return plan, ["webdataset, dali: need a shard folder (hpcgan prepare); --data is an image folder"]
    plan["webdataset"] = ("webdataset", device)
    if not dali_available():
        notes.append("dali: NVIDIA DALI is not installed (pip install 'hpcgan[dali]')")
        return plan, notes
    plan["dali-cpu"] = ("dali", torch.device("cpu"))
    if torch.cuda.is_available():
        plan["dali-gpu"] = ("dali", torch.device("cuda"))
    else:
        notes.append("dali-gpu: no GPU")
    return plan, notes


def reader_images_per_s(images: BenchImages, reader: str, device: torch.device, *, batch: int, workers: int,
                        warmup: int, batches: int) -> float:
    cfg = DataConfig(path=str(images.path), reader=reader, workers=workers)
    batch_reader = build_reader(cfg, seed=0, global_batch=batch, rank=0, world=1, device=device,
                                resolution=images.resolution)
    for _ in range(warmup):
        batch_reader.next_batch()
    sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        batch_reader.next_batch()
    sync(device)
    return batches * batch / (time.perf_counter() - start)
