"""Resuming on another number of processes: the global batch, the data order and the augmentation carry
over; each rank's RNG streams are derived afresh from (seed, rank, step)."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_factories import make_shards
from ddp_worker import indexed_images, record_samples
from helpers import REPO, TINY, assert_identical, final_weights, make_trainer, torchrun
from hpcgan.augment import AugmentPipe
from hpcgan.config import AugmentConfig, DataConfig
from hpcgan.data import build_reader, load_split
from hpcgan.data.memory import MemoryReader
from hpcgan.data.reader import global_position
from hpcgan.train.checkpoint import rank_file_name
from hpcgan.train.distributed import (carry_rank0_augment, from_global_position, rederive_rng,
                                     resume_on_new_world)
from hpcgan.train.state import GlobalRNG, TrainState

CPU = torch.device("cpu")


def source(path: Path, reader: str, *, rank: int, world: int, flip: bool = True):
    if reader == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = DataConfig(path=str(path), reader=reader, flip=flip, workers=0)
    return build_reader(cfg, seed=3, global_batch=16, rank=rank, world=world, device=CPU)


def image_counts(images: torch.Tensor) -> Counter[bytes]:
    pixels = ((images + 1) * 127.5).round().to(torch.uint8)
    return Counter(a.numpy().tobytes() for a in pixels)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """96 distinct train images: 6 global batches of 16 per epoch."""
    folder = tmp_path_factory.mktemp("shards")
    make_shards(folder, n_train=96)
    return folder


def move(readers: list, world: int, path: Path, reader: str, flip: bool = True) -> list:
    """The readers of `world` processes continuing from `readers`, restored as the trainer restores them:
    a rank's own old position where it has one, then the global position of rank 0."""
    position = global_position(readers[0].state_dict())
    moved = [source(path, reader, rank=r, world=world, flip=flip) for r in range(world)]
    for rank, new in enumerate(moved):
        if rank < len(readers):
            new.load_state_dict(json.loads(json.dumps(readers[rank].state_dict())))
        new.load_state_dict(position)
    return moved


@pytest.mark.parametrize("reader", ["memory", "webdataset"])
@pytest.mark.parametrize("worlds", [(2, 1), (1, 4), (4, 2)])
def test_global_order_continues_on_another_world_size(shard_dir: Path, reader: str, worlds: tuple[int, int]) -> None:
    single = source(shard_dir, reader, rank=0, world=1)
    expected = [single.next_batch().images for _ in range(9)]  # into the second epoch
    readers = [source(shard_dir, reader, rank=r, world=worlds[0]) for r in range(worlds[0])]
    got = [torch.cat([src.next_batch().images for src in readers]) for _ in range(4)]
    readers = move(readers, worlds[1], shard_dir, reader)
    got += [torch.cat([src.next_batch().images for src in readers]) for _ in range(5)]
    for step, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"global batch {step} differs"


def test_dali_keeps_the_epoch_then_serves_every_image_once(shard_dir: Path) -> None:
    readers = [source(shard_dir, "dali", rank=r, world=2, flip=False) for r in range(2)]
    for _ in range(2):
        for src in readers:
            src.next_batch()
    readers = move(readers, 4, shard_dir, "dali", flip=False)
    for src in readers:
        for _ in range(4):  # the rest of epoch 0, cut for 4 processes
            src.next_batch()
        assert global_position(src.state_dict()) == {"epoch": 0, "batch": 6}
    epoch = torch.cat([src.next_batch().images for src in readers for _ in range(6)])
    full = load_split(shard_dir, "train").float().div(127.5).sub(1)
    assert image_counts(epoch) == image_counts(full)


def test_resume_on_new_world_carries_global_state(tmp_path: Path) -> None:
    """Two old ranks' augmentation files -> rank 0 and 1 of a 4-process world."""
    cfg = AugmentConfig(mode="ada", p=0.2)
    folder = tmp_path / "step-0000006"
    folder.mkdir()
    for old, logits in enumerate(([1.0, 1.0, -1.0], [1.0, 1.0, 1.0, 1.0, -1.0])):
        pipe = AugmentPipe(cfg, seed=0, rank=old)
        pipe.p = 0.35
        pipe.observe(torch.tensor(logits))
        torch.save({"augment": pipe.state_dict()}, folder / rank_file_name(old))
    state = TrainState(step=6, images_seen=96, data={"epoch": 1, "batch": 0}, world_size=2)
    draws, pipes = [], []
    for rank in (0, 1, 0):
        reader = MemoryReader(indexed_images(32, size=8), seed=0, global_batch=8, rank=rank, world=4)
        pipe = AugmentPipe(cfg, seed=0, rank=rank)
        parts = [("data", reader, from_global_position), ("rng", GlobalRNG(), rederive_rng),
                 ("augment", pipe, carry_rank0_augment)]
        line = resume_on_new_world(folder, state, parts, seed=0, rank=rank, world=4, global_batch=8)
        draws.append(torch.rand(4))
        pipes.append(pipe.state_dict())
        assert reader.state_dict() == {"epoch": 1, "batch": 0}
    assert line == ("resuming with 4 processes a checkpoint written by 2: global batch 8 kept (2 per process), "
                    "data position epoch 1 batch 0 kept, RNG streams re-derived from (seed, rank, step), "
                    "augmentation p=0.35 kept")
    assert [p["p"] for p in pipes] == [0.35] * 3
    assert pipes[0]["signs"].tolist() == [4.0, 8.0] and pipes[1]["signs"].tolist() == [0.0, 0.0]
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])
    assert torch.equal(pipes[0]["rng"], pipes[2]["rng"]) and not torch.equal(pipes[0]["rng"], pipes[1]["rng"])


def test_every_per_rank_part_has_a_reshard_rule(image_folder: Path, tmp_path: Path) -> None:
    """The trainer's per-rank parts each come with their rule; a part registered without one is refused."""
    trainer = make_trainer(image_folder, tmp_path / "run", "augment.mode=ada")
    parts = trainer.ckpt.rank_parts()
    assert [(name, rule) for name, _, rule in parts] == [
        ("data", from_global_position), ("rng", rederive_rng), ("augment", carry_rank0_augment)]
    with pytest.raises(TypeError, match="per-rank checkpoint part 'extra' needs a reshard rule"):
        trainer.ckpt.register_rank("extra", GlobalRNG(), reshard=None)
    with pytest.raises(TypeError):
        trainer.ckpt.register_rank("extra", GlobalRNG())  # the rule is a required argument
    assert len(trainer.ckpt.rank_parts()) == 3


@pytest.mark.slow
def test_samples_of_an_epoch_survive_changes_of_world_size(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """2 processes for 3 steps, 1 to step 5, 4 across the end of the epoch to step 8, 2 to step 10: every
    step draws the global batch an uninterrupted run draws, so epoch 0 serves each of the 48 images once."""
    data = tmp_path / "indexed.pt"
    torch.save(indexed_images(48), data)  # 6 global batches of 8 per epoch
    sets = [f"data.path={data}", *TINY, "augment.mode=ada", "augment.interval=2"]

    straight: list[dict] = []
    trainer = make_trainer(data, tmp_path / "straight", *sets, "train.steps=10")
    record_samples(trainer, straight)
    assert trainer.fit() == 0
    expected = {r["step"]: r["samples"] for r in straight}

    run, seen = tmp_path / "run", []
    segments = [(2, 3, "epoch 0 batch 0"), (1, 5, "epoch 0 batch 3"), (4, 8, "epoch 0 batch 5"),
                (2, 10, "epoch 1 batch 2")]
    for number, (world, steps, position) in enumerate(segments):
        out = tmp_path / f"seen-{number}"
        out.mkdir()
        proc = torchrun(world, str(REPO / "tests" / "ddp_worker.py"), "--record", str(run), str(out), *sets,
                        f"train.steps={steps}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        if number:
            before = segments[number - 1][0]
            processes = "1 process" if world == 1 else f"{world} processes"
            assert (f"resuming with {processes} a checkpoint written by {before}: global batch 8 kept "
                    f"({8 // world} per process), data position {position} kept, RNG streams re-derived from "
                    "(seed, rank, step), augmentation p=") in proc.stderr
        for rank in range(world):
            seen += json.loads((out / f"seen-{world}-{rank}.json").read_text())

    chained = {}
    for step in sorted({r["step"] for r in seen}):
        records = sorted((r for r in seen if r["step"] == step), key=lambda r: r["rank"])
        assert len({r["world"] for r in records}) == 1 and len(records) == records[0]["world"]
        chained[step] = sum((r["samples"] for r in records), [])
    assert chained == expected  # step by step, sample by sample
    assert sorted(sum((chained[s] for s in range(6)), [])) == list(range(48))  # epoch 0: none twice, none skipped
    assert len(set(sum((chained[s] for s in range(6, 10)), []))) == 32

    # The RNG streams of a changed world are a function of (seed, rank, step): resuming twice is identical.
    copies = [tmp_path / "again-a", tmp_path / "again-b"]
    for copy in copies:
        shutil.copytree(run, copy)
        with caplog.at_level(logging.INFO, logger="hpcgan.train.loop"):
            assert make_trainer(data, copy, *sets, "train.steps=11").fit() == 0
        assert "resuming with 1 process a checkpoint written by 2:" in caplog.text
    assert_identical(final_weights(copies[0]), final_weights(copies[1]))
