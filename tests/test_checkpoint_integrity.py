"""Verified checkpoints: any damaged byte is caught in one line naming the file and the check, and the newest
intact older checkpoint is used instead, by resume, sampling and `hpcgan checkpoint verify`."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest
import torch

from hpcgan.cli import main
from hpcgan.train.checkpoint import (HASH_SCHEME, MARKER, CheckpointError, CheckpointManager, file_hash, load_torch,
                                     resolve_checkpoint, verify)
from hpcgan.train.generator import load_generator

from helpers import TINY, assert_identical, final_weights, make_trainer, run_cli, torchrun

SETTINGS = ("checkpoint.every=3",)


@pytest.fixture(scope="module")
def runs(image_folder, tmp_path_factory):
    """A run stopped at step 6 (checkpoints 3 and 6) and the weights of an uninterrupted 8-step run."""
    root = tmp_path_factory.mktemp("integrity")
    assert make_trainer(image_folder, root / "six", *SETTINGS, "train.steps=6").fit() == 0
    assert make_trainer(image_folder, root / "straight", *SETTINGS, "train.steps=8").fit() == 0
    return root / "six", final_weights(root / "straight")


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def offset_of(path: Path, tensor: torch.Tensor) -> int:
    """Where a tensor's raw bytes lie inside a torch.save file (its storage, as saved, uncompressed): the
    middle byte."""
    raw = bytes(tensor.untyped_storage().tolist())
    start = path.read_bytes().find(raw)
    assert start > 0, f"tensor bytes not found in {path}"
    return start + len(raw) // 2


def tensor_byte(folder: Path) -> None:
    model = folder / "model.pt"
    flip(model, offset_of(model, load_torch(model)["G"]["net.0.weight"]))


def zip_header(folder: Path) -> None:
    flip(folder / "model.pt", 0)  # the first local file header's signature


def state_json(folder: Path) -> None:
    path = folder / "state.json"
    path.write_text(path.read_text().replace('"step": 6', '"step": 7'))


def rng_state(folder: Path) -> None:
    rank = folder / "rank-00000.pt"
    flip(rank, offset_of(rank, load_torch(rank)["rng"]["torch"]))


def optim_byte(folder: Path) -> None:
    optim = folder / "optim.pt"
    state = load_torch(optim)["D"]["state"]
    flip(optim, offset_of(optim, state[min(state)]["exp_avg"]))


def truncate_model(folder: Path) -> None:
    model = folder / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])


def truncate_rank(folder: Path) -> None:
    rank = folder / "rank-00000.pt"
    rank.write_bytes(rank.read_bytes()[:-1])


def missing_file(folder: Path) -> None:
    (folder / "optim.pt").unlink()


def garbled_marker(folder: Path) -> None:
    (folder / MARKER).write_text('{"step": 6, "files": ')


DAMAGE = {  # how, and the one line's file and check
    "tensor byte in model.pt": (tensor_byte, "model.pt: hash check failed: bytes"),
    "zip header of model.pt": (zip_header, "model.pt: hash check failed: differs from the recorded hash"),
    "state.json": (state_json, "state.json: hash check failed: differs from the recorded hash"),
    "RNG state in rank-00000.pt": (rng_state, "rank-00000.pt: hash check failed: bytes"),
    "tensor byte in optim.pt": (optim_byte, "optim.pt: hash check failed: bytes"),
    "model.pt truncated": (truncate_model, "model.pt: size 1000 bytes, recorded"),
    "rank-00000.pt truncated": (truncate_rank, "rank-00000.pt: size"),
    "optim.pt missing": (missing_file, "optim.pt: missing"),
    "marker unparsable": (garbled_marker, "COMPLETE: unparsable marker"),
}


def damaged_copy(runs, tmp_path: Path, kind: str) -> Path:
    six, _ = runs
    out = tmp_path / "run"
    shutil.copytree(six, out)
    DAMAGE[kind][0](out / "checkpoints" / "step-0000006")
    return out


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_is_named_in_one_line_and_the_older_checkpoint_chosen(runs, tmp_path, kind, caplog):
    out = damaged_copy(runs, tmp_path, kind)
    newest = out / "checkpoints" / "step-0000006"
    assert DAMAGE[kind][1] in verify(newest)
    with caplog.at_level(logging.WARNING, logger="hpcgan"):
        assert CheckpointManager(out / "checkpoints", keep=3).latest() == out / "checkpoints" / "step-0000003"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and str(newest) in lines[0] and DAMAGE[kind][1] in lines[0], lines


def test_intact_checkpoints_verify_and_record_hashes(runs):
    six, _ = runs
    for step in ("step-0000003", "step-0000006"):
        folder = six / "checkpoints" / step
        marker = json.loads((folder / MARKER).read_text())
        assert verify(folder) is None
        assert marker["hash"] == HASH_SCHEME and set(marker["digests"]) == set(marker["files"]) == {
            "config.yaml", "model.pt", "optim.pt", "state.json", "rank-00000.pt"}


def test_resume_falls_back_and_is_bit_exact(runs, image_folder, tmp_path, caplog):
    """A flipped bit inside a tensor of the newest checkpoint: resume takes step 3 and lands on the
    uninterrupted run's weights; the damaged step 6 is rewritten on the way."""
    _, straight = runs
    out = damaged_copy(runs, tmp_path, "tensor byte in model.pt")
    trainer = make_trainer(image_folder, out, *SETTINGS, "train.steps=8")
    with caplog.at_level(logging.INFO, logger="hpcgan"):
        assert trainer.fit() == 0
    assert "step-0000006 is damaged (model.pt: hash check failed" in caplog.text
    assert f"resumed from {out / 'checkpoints' / 'step-0000003'}" in caplog.text
    assert_identical(final_weights(out), straight)
    assert verify(out / "checkpoints" / "step-0000006") is None


@pytest.mark.slow
@pytest.mark.parametrize("kind", [k for k in DAMAGE if k != "tensor byte in model.pt"])
def test_resume_falls_back_and_is_bit_exact_for_every_damage(runs, image_folder, tmp_path, kind):
    _, straight = runs
    out = damaged_copy(runs, tmp_path, kind)
    assert make_trainer(image_folder, out, *SETTINGS, "train.steps=8").fit() == 0
    assert_identical(final_weights(out), straight)


def test_sampling_refuses_a_damaged_folder_and_falls_back_in_a_run(runs, tmp_path, capsys, caplog):
    out = damaged_copy(runs, tmp_path, "tensor byte in model.pt")
    checkpoints = out / "checkpoints"
    best = CheckpointManager(checkpoints, keep=3, best=out / "best").promote_best(checkpoints / "step-0000006")
    with pytest.raises(CheckpointError, match=r"best is a damaged checkpoint \(model.pt: hash check failed"):
        resolve_checkpoint(best)
    code = main(["sample", "--run", str(best), "--n", "2", "--out", str(tmp_path / "png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "damaged checkpoint (model.pt: hash check failed" in err[0]
    with caplog.at_level(logging.WARNING, logger="hpcgan"):
        generator = load_generator(out)  # the run folder: the newest intact step
    assert "step-0000006 is damaged" in caplog.text
    reference = load_torch(checkpoints / "step-0000003" / "model.pt")["G_ema"]
    assert_identical(generator.state_dict(), reference)
    for folder in (checkpoints / "step-0000003", checkpoints / "step-0000006"):
        shutil.rmtree(folder)
    with pytest.raises(CheckpointError, match="no intact checkpoint found"):
        resolve_checkpoint(out)


def test_checkpoint_verify_cli(runs, tmp_path):
    six, _ = runs
    intact = run_cli("checkpoint", "verify", str(six))
    assert intact.returncode == 0, intact.stderr
    assert intact.stdout.splitlines() == ["step-0000003: ok", "step-0000006: ok", "resume would use step-0000006"]

    out = damaged_copy(runs, tmp_path, "state.json")
    checkpoints = out / "checkpoints"
    best = CheckpointManager(checkpoints, keep=3, best=out / "best").promote_best(checkpoints / "step-0000003")
    truncate_model(best)
    damaged = run_cli("checkpoint", "verify", str(out))
    assert damaged.returncode == 1, damaged.stderr
    assert damaged.stdout.splitlines() == [
        "step-0000003: ok",
        "step-0000006: DAMAGED: state.json: hash check failed: differs from the recorded hash",
        "best (step 3): DAMAGED: model.pt: size 1000 bytes, recorded "
        f"{(checkpoints / 'step-0000003' / 'model.pt').stat().st_size}",
        "resume would use step-0000003",
    ]
    missing = run_cli("checkpoint", "verify", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "nowhere: not a run folder" in missing.stderr.strip().splitlines()[-1]


def test_hashing_costs_under_5_percent_of_a_save(image_folder, tmp_path):
    """The full-width DCGAN-64 (G, D, EMA, optimizers): hashing a checkpoint's bytes, as `save` does from
    memory, against the save itself without hashes (the best of 3 each, so load elsewhere counts less)."""
    manager = make_trainer(image_folder, tmp_path / "run", "model.ngf=64", "model.ndf=64").ckpt
    manager.hashing = False
    saves = []
    for step in range(3):
        start = time.perf_counter()
        folder = manager.save(step)
        saves.append(time.perf_counter() - start)
    assert "digests" not in json.loads((folder / MARKER).read_text())
    blobs = [p.read_bytes() for p in folder.iterdir() if p.name != MARKER]
    hashes = []
    for _ in range(3):
        start = time.perf_counter()
        for blob in blobs:
            file_hash(blob)
        hashes.append(time.perf_counter() - start)
    ratio = min(hashes) / min(saves)
    print(f"hashing {min(hashes) * 1e3:.2f} ms of a {min(saves) * 1e3:.0f} ms save: {ratio:.2%}")
    assert ratio < 0.05


@pytest.mark.slow
def test_two_ranks_agree_on_the_fallback(image_folder, tmp_path):
    """Two gloo processes: rank 0 verifies and chooses, both load the older checkpoint, no hang."""
    sets = [a for kv in [*TINY, *SETTINGS] for a in ("--set", kv)]

    def train(out, steps):
        proc = torchrun(2, "-m", "hpcgan", "train", "--data", str(image_folder), "--out", str(out),
                        "--set", f"train.steps={steps}", *sets, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    train(tmp_path / "straight", 8)
    train(tmp_path / "resumed", 6)
    rng_state(tmp_path / "resumed" / "checkpoints" / "step-0000006")
    flip(tmp_path / "resumed" / "checkpoints" / "step-0000006" / "rank-00001.pt", 100)
    log = train(tmp_path / "resumed", 8)
    assert "step-0000006 is damaged (rank-00000.pt: hash check failed" in log
    assert "resumed from" in log and "step-0000003" in log
    assert_identical(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "straight"))
