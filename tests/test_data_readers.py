"""The readers behind `build_reader`: same images, exact resume, per-rank shares, bad shards."""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_factories import brain, make_shards, run_prepare, write_image, write_nifti
from hpcgan.config import DataConfig
from hpcgan.data import DataError, build_reader, load_split, shards

READERS = ["memory", "webdataset", "dali"]
CPU = torch.device("cpu")


def source(path: Path, reader: str, *, batch: int = 16, rank: int = 0, world: int = 1, flip: bool = True,
           workers: int = 0, resolution: int | None = None):
    if reader == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = DataConfig(path=str(path), reader=reader, flip=flip, workers=workers)
    return build_reader(cfg, seed=3, global_batch=batch, rank=rank, world=world, device=CPU,
                        resolution=resolution)


def as_uint8(x: torch.Tensor) -> torch.Tensor:
    y = (x + 1) * 127.5
    assert (y - y.round()).abs().max() < 1e-3, "not an exact uint8 image mapped to [-1, 1]"
    return y.round().to(torch.uint8)


def image_counts(images: torch.Tensor) -> Counter[bytes]:
    return Counter(a.numpy().tobytes() for a in images)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """96 distinct train images (3 shards of 40, 40, 16) and 8 val images."""
    folder = tmp_path_factory.mktemp("shards")
    make_shards(folder, n_train=96, n_val=8)
    return folder


@pytest.mark.parametrize("reader", READERS)
def test_each_epoch_serves_every_image_once(shard_dir: Path, reader: str) -> None:
    full = image_counts(load_split(shard_dir, "train"))
    src = source(shard_dir, reader, flip=False)
    assert (src.num_images, src.batches_per_epoch, src.image_shape) == (96, 6, (1, 16, 16))
    epochs = []
    for _ in range(2):
        batches = [src.next_batch().images for _ in range(src.batches_per_epoch)]
        assert all(b.shape == (16, 1, 16, 16) and b.dtype == torch.float32 for b in batches)
        epochs.append(as_uint8(torch.cat(batches)))
        assert image_counts(epochs[-1]) == full
    assert not torch.equal(epochs[0], epochs[1])  # a new order each epoch


def test_webdataset_order_depends_on_seed_and_epoch_only(shard_dir: Path) -> None:
    """The same batches, flips included, with any number of workers; flips do not change the order."""
    for rank, world in ((0, 1), (1, 2)):
        inline = source(shard_dir, "webdataset", rank=rank, world=world, workers=0)
        workers = source(shard_dir, "webdataset", rank=rank, world=world, workers=2)
        for _ in range(14):  # over two epochs
            assert torch.equal(inline.next_batch().images, workers.next_batch().images)
    flipped, plain = source(shard_dir, "webdataset"), source(shard_dir, "webdataset", flip=False)
    mirrored = 0
    for _ in range(6):
        a, b = flipped.next_batch().images, plain.next_batch().images
        same, mirror = (a == b).flatten(1).all(1), (a == b.flip(-1)).flatten(1).all(1)
        assert (same | mirror).all()
        mirrored += int((mirror & ~same).sum())
    assert 20 < mirrored < 76  # about half of 96


def test_webdataset_streams_through_the_webdataset_library(shard_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import webdataset

    import hpcgan.data.webdataset_reader as reader

    opened = []

    class Spy(webdataset.WebDataset):
        def __init__(self, urls, **kw):  # noqa: ANN001, ANN003
            opened.append(list(urls))
            super().__init__(urls, **kw)

    monkeypatch.setattr(reader.wds, "WebDataset", Spy)
    src = source(shard_dir, "webdataset")
    src.next_batch()
    assert sorted(opened[0]) == sorted(str(t) for t in sorted(shard_dir.glob("train-*.tar")))


def test_dali_reads_the_index_files_prepare_writes(shard_dir: Path) -> None:
    wds2idx = pytest.importorskip("wds2idx")  # DALI's own index tool
    tar = shard_dir / "train-000000.tar"
    theirs = shard_dir.parent / "theirs.idx"
    with wds2idx.IndexCreator(str(tar), str(theirs), verbose=False) as creator:
        creator.create_index()
    assert theirs.read_text() == shards.index_path(tar).read_text()


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("stop", [4, 6, 11])  # mid-epoch, at the epoch end, in the second epoch
def test_resume_is_exact(tmp_path: Path, reader: str, stop: int) -> None:
    make_shards(tmp_path, n_train=101)  # 6 batches of 16 and 5 left over: DALI pads and skips a tail
    first = source(tmp_path, reader, workers=1)
    for _ in range(stop):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    expected = [first.next_batch().images for _ in range(8)]
    resumed = source(tmp_path, reader, workers=1)
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(resumed.next_batch().images, want)


@pytest.mark.parametrize("stop", [3, 6, 8])
def test_dali_resumes_from_another_ranks_state(tmp_path: Path, stop: int) -> None:
    """The trainer may save rank 0's state only: rank 1 must still continue exactly."""
    make_shards(tmp_path, n_train=101)
    ranks = [source(tmp_path, "dali", rank=r, world=2, workers=1) for r in range(2)]
    for _ in range(stop):
        for src in ranks:
            src.next_batch()
    state = json.loads(json.dumps(ranks[0].state_dict()))
    expected = [ranks[1].next_batch().images for _ in range(5)]
    resumed = source(tmp_path, "dali", rank=1, world=2, workers=1)
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(resumed.next_batch().images, want)


@pytest.mark.parametrize("reader", READERS)
def test_ranks_split_each_global_batch(shard_dir: Path, reader: str) -> None:
    seen = [as_uint8(torch.cat([source(shard_dir, reader, rank=r, world=2, flip=False).next_batch().images
                                for _ in range(1)])) for r in range(2)]
    assert seen[0].shape == (8, 1, 16, 16) and not set(image_counts(seen[0])) & set(image_counts(seen[1]))


def _one_epoch(args: tuple[str, str, int]) -> list[bytes]:
    """In a fresh process: this rank's batches of one epoch, as raw uint8 bytes."""
    path, reader, rank = args
    src = build_reader(DataConfig(path=path, reader=reader, flip=False, workers=0), seed=3, global_batch=16,
                       rank=rank, world=2, device=CPU)
    return [as_uint8(src.next_batch().images).numpy().tobytes() for _ in range(src.batches_per_epoch)]


@pytest.mark.slow
@pytest.mark.parametrize("reader", READERS)
def test_two_processes_share_an_epoch(shard_dir: Path, reader: str) -> None:
    if reader == "dali":
        pytest.importorskip("nvidia.dali")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        per_rank = pool.map(_one_epoch, [(str(shard_dir), reader, r) for r in range(2)])
    images = [np.frombuffer(b"".join(batches), np.uint8).reshape(-1, 1, 16, 16).copy() for batches in per_rank]
    counts = [image_counts(torch.from_numpy(i)) for i in images]
    assert len(per_rank[0]) == len(per_rank[1]) == 6  # the same number of steps on every rank
    assert counts[0] + counts[1] == image_counts(load_split(shard_dir, "train"))
    if reader != "dali":  # memory/webdataset: rank r holds slice r of the single-process global batch
        single = source(shard_dir, reader, flip=False)
        for step in range(6):
            whole = as_uint8(single.next_batch().images).numpy()
            assert np.array_equal(whole[:8].tobytes(), per_rank[0][step])
            assert np.array_equal(whole[8:].tobytes(), per_rank[1][step])


def _damage(folder: Path, how: str) -> Path:
    tar = folder / "train-000001.tar"
    if how == "truncated tar":
        tar.write_bytes(tar.read_bytes()[:5000])
    elif how == "index of another tar":
        shutil.copy(folder / "train-000000.idx", folder / "train-000001.idx")
    elif how == "missing index":
        (folder / "train-000001.idx").unlink()
    elif how == "sample without png":  # rewrite the shard (and manifest) with one .png left out
        manifest = shards.read_manifest(folder)
        writer = shards.ShardWriter(tar)
        writer.add("a", {"16.png": (folder / "train-000000.tar").read_bytes()[512:600], "json": b"{}"})
        writer.add("b", {"json": b"{}"})
        record = writer.close() | {"split": "train"}
        manifest["shards"] = [record if r["name"] == tar.name else r for r in manifest["shards"]]
        shards.write_manifest(folder, manifest)
    return tar


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("how", ["truncated tar", "index of another tar", "missing index", "sample without png"])
def test_damaged_shard_fails_in_one_line_naming_it(tmp_path: Path, reader: str, how: str) -> None:
    make_shards(tmp_path, n_train=96)
    tar = _damage(tmp_path, how)
    with pytest.raises(DataError) as err:
        source(tmp_path, reader)
    message = str(err.value)
    assert str(tar) in message and "\n" not in message and "re-run hpcgan prepare" in message


def test_corrupt_png_inside_a_valid_shard_fails_naming_it(tmp_path: Path) -> None:
    make_shards(tmp_path, n_train=32, shard_size=32)
    tar = tmp_path / "train-000000.tar"
    data = bytearray(tar.read_bytes())
    data[512 + 40:512 + 60] = b"\0" * 20  # inside the first PNG's IDAT stream
    tar.write_bytes(bytes(data))
    for reader, workers in (("memory", 0), ("webdataset", 2)):
        with pytest.raises(DataError, match=str(tar)) as err:
            src = source(tmp_path, reader, workers=workers, flip=False, batch=32)
            src.next_batch()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("how", ["cut inside a member", "cut at a header", "sample without png"])
def test_webdataset_shard_damaged_after_opening_fails_naming_it(tmp_path: Path, how: str) -> None:
    """Damage the validation at open time cannot see: webdataset's errors become one line naming the shard."""
    make_shards(tmp_path, n_train=96)
    src = source(tmp_path, "webdataset", workers=1, batch=32)
    tar = tmp_path / "train-000001.tar"
    data = tar.read_bytes()
    if how == "cut inside a member":
        tar.write_bytes(data[:5000])
    elif how == "cut at a header":  # a tar that ends cleanly after a few samples
        tar.write_bytes(data[:shards.read_index(shards.index_path(tar), tar)[3]["16.png"][0] - 512])
    else:
        writer = shards.ShardWriter(tar)
        writer.add("a", {"json": b"{}"})
        writer.close()
    with pytest.raises(DataError) as err:
        for _ in range(src.batches_per_epoch):
            src.next_batch()
    message = str(err.value)
    assert str(tar) in message and "\n" not in message and "re-run hpcgan prepare" in message


def test_auto_reader_choice(shard_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import hpcgan.data as data
    from hpcgan.data.memory import MemoryReader
    from hpcgan.data.webdataset_reader import WebDatasetReader

    assert isinstance(source(shard_dir, "auto"), MemoryReader)
    monkeypatch.setattr(data, "MEMORY_LIMIT_BYTES", 0)
    if data.dali_available():
        from hpcgan.data.dali_reader import DaliReader

        assert isinstance(source(shard_dir, "auto"), DaliReader)
    monkeypatch.setattr(data, "dali_available", lambda: False)
    monkeypatch.setattr(data, "_said_no_dali", False)
    with caplog.at_level(logging.WARNING, logger="hpcgan.data"):
        assert isinstance(source(shard_dir, "auto"), WebDatasetReader)
        assert isinstance(source(shard_dir, "auto"), WebDatasetReader)
    assert sum("DALI is not installed" in r.message for r in caplog.records) == 1
    with pytest.raises(DataError, match="DALI is not installed"):
        build_reader(DataConfig(path=str(shard_dir), reader="dali"), seed=0, global_batch=8, rank=0, world=1,
                     device=CPU)


def test_resolution_picks_the_size_and_plain_folders_still_work(tmp_path: Path) -> None:
    make_shards(tmp_path / "shards", n_train=32, sizes=(16, 32))
    assert source(tmp_path / "shards", "memory", resolution=32).image_shape == (1, 32, 32)
    assert source(tmp_path / "shards", "webdataset", resolution=16).image_shape == (1, 16, 16)
    with pytest.raises(DataError, match="sizes \\[16, 32\\], not 64"):
        source(tmp_path / "shards", "memory", resolution=64)
    assert load_split(tmp_path / "shards", "val").shape == (0, 1, 16, 16)

    for i in range(16):
        write_image(tmp_path / "folder" / f"{i}.png", np.full((16, 16), i * 10, np.uint8))
    assert source(tmp_path / "folder", "auto", resolution=16).image_shape == (1, 16, 16)
    with pytest.raises(DataError, match="needs prepared shards"):
        source(tmp_path / "folder", "webdataset")
    with pytest.raises(DataError, match="the model needs 64x64"):
        source(tmp_path / "folder", "memory", resolution=64)


def test_quickstart_shards_from_nilearn(tmp_path: Path) -> None:
    from hpcgan.data.quickstart import quickstart_shards

    out = quickstart_shards(tmp_path / "qs")
    manifest = shards.read_manifest(out)
    assert manifest["counts"]["train"] > 500 and manifest["counts"]["val"] > 80
    assert {s["kind"] for s in manifest["sources"]} == {"nifti"} and (out / "NOTICE").is_file()
    assert manifest["classes"] == ["axial", "coronal", "sagittal"] and manifest["label_source"] == "axis"
    assert all(set(manifest["class_counts"][split]) == set(manifest["classes"]) for split in ("train", "val"))
    start = time.perf_counter()
    assert quickstart_shards(tmp_path / "qs") == out
    assert time.perf_counter() - start < 1.0
    assert source(out, "auto", batch=64, resolution=64).image_shape == (1, 64, 64)


def test_16_bit_shards_read_the_same_with_every_reader(tmp_path: Path) -> None:
    write_nifti(tmp_path / "v.nii.gz", brain((20, 24, 18), seed=2))
    assert run_prepare(tmp_path / "v.nii.gz", "--out", tmp_path / "out", "--size", 16, "--bit-depth", 16,
                       "--val-frac", 0, "--workers", 1) == 0
    n = load_split(tmp_path / "out", "train").shape[0]
    batch = max(b for b in range(1, 17) if n % b == 0)  # no remainder: every image in each epoch
    epochs = {}
    for reader in READERS:
        src = source(tmp_path / "out", reader, batch=batch, flip=False)
        batches = [src.next_batch().images for _ in range(src.batches_per_epoch)]
        epochs[reader] = image_counts(as_uint8(torch.cat(batches)))
    assert epochs["memory"] == epochs["webdataset"] == epochs["dali"]


ABANDONED_ITERATOR = """
import gc, sys
from hpcgan.config import DataConfig
from hpcgan.data import build_reader
gc.disable()  # the abandoned iterator below is never collected
reader = build_reader(DataConfig(path=sys.argv[1], reader="webdataset", workers=2), seed=3, global_batch=16,
                      rank=0, world=1, device="cpu")
reader.next_batch()
cycle = [reader._iter]
cycle.append(cycle)
del reader, cycle  # workers still running, their reader gone, the iterator never shut down
print("left", flush=True)
"""


def test_a_process_exits_with_an_abandoned_webdataset_iterator(shard_dir: Path) -> None:
    """Workers ignore SIGTERM, which multiprocessing's exit hook relies on: without the reader's own exit
    hook a process that leaves a running iterator behind waits for its workers forever."""
    done = subprocess.run([sys.executable, "-c", ABANDONED_ITERATOR, str(shard_dir)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "left"
