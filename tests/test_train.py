"""The trainer end to end on CPU: exact resume, checkpoint integrity, mixed precision, bad input."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import pytest
import torch

import hpcgan
from hpcgan.cli import main
from hpcgan.train import EXIT_INTERRUPTED
from hpcgan.train.checkpoint import MARKER, CheckpointManager, file_hash
from hpcgan.train.precision import native_bf16, resolve_mixed_precision

from helpers import TINY, assert_identical, cli_env, final_weights, hpcgan_cmd, make_trainer, run_cli, train_args
from data_factories import make_shards


@pytest.fixture(scope="module")
def reference_run(image_folder, tmp_path_factory):
    """40 uninterrupted steps; every resume test must land on exactly these weights."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert make_trainer(image_folder, out, "train.steps=40", "checkpoint.every=5").fit() == 0
    return final_weights(out)


def test_resume_after_stop_at_17_is_bit_exact(image_folder, tmp_path, reference_run):
    out = tmp_path / "run"
    assert make_trainer(image_folder, out, "train.steps=17", "checkpoint.every=5").fit() == 0
    assert CheckpointManager(out / "checkpoints", keep=3).complete_steps() == [10, 15, 17]
    trainer = make_trainer(image_folder, out, "train.steps=40", "checkpoint.every=5")
    assert trainer.fit() == 0
    assert trainer.state.restarts == 1 and trainer.state.images_seen == 40 * 8
    assert_identical(final_weights(out), reference_run)
    # 48 images / batch 8 = 6 batches an epoch: step 40 is mid-epoch 6, as in the reference
    assert trainer.reader.state_dict() == {"epoch": 6, "batch": 4}


def test_signal_mid_run_saves_exits_resumable_and_resumes_exactly(image_folder, tmp_path, reference_run):
    out = tmp_path / "run"
    args = ["train", "--data", str(image_folder), "--out", str(out), "--set", "train.steps=40",
            "--set", "checkpoint.every=5", *[a for kv in TINY for a in ("--set", kv)]]
    proc = subprocess.Popen(hpcgan_cmd(*args), env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, "training ended before the signal"
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, output
    stopped = CheckpointManager(out / "checkpoints", keep=3).complete_steps()[-1]
    assert 3 <= stopped < 40, output
    assert "resumable" in output
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'checkpoints'}" in resumed.stderr
    assert_identical(final_weights(out), reference_run)


def test_interrupt_mid_step_undoes_the_step_and_resumes_exactly(image_folder, tmp_path, reference_run, caplog):
    """A signal during step 13's D forward: steps 1-12 are saved at once, step 13 is redone on resume."""
    out = tmp_path / "run"
    trainer = make_trainer(image_folder, out, "train.steps=40", "checkpoint.every=5")

    def signal_during_step_13(module, inputs, output):
        if trainer.state.step == 12:
            trainer.interrupt.signum = signal.SIGUSR1  # what the installed handler does

    trainer.discriminator.register_forward_hook(signal_during_step_13)
    with caplog.at_level("WARNING", logger="hpcgan"):
        assert trainer.fit() == EXIT_INTERRUPTED
    assert "during the step after step 12" in caplog.text
    assert CheckpointManager(out / "checkpoints", keep=3).complete_steps()[-1] == 12
    assert make_trainer(image_folder, out, "train.steps=40", "checkpoint.every=5").fit() == 0
    assert_identical(final_weights(out), reference_run)


def test_interrupt_during_the_first_step_saves_nothing_new(image_folder, tmp_path, caplog):
    """Fresh or resumed, a signal before this process's first step completes leaves the checkpoints as
    they were: a restart rebuilds that state anyway."""
    out = tmp_path / "run"
    for steps, before in [(4, []), (8, [4])]:
        if before:
            assert make_trainer(image_folder, out, "train.steps=4", "checkpoint.every=4").fit() == 0
        trainer = make_trainer(image_folder, out, f"train.steps={steps}", "checkpoint.every=4")

        def signal_during_the_first_step(module, inputs, output):
            trainer.interrupt.signum = signal.SIGTERM  # what the installed handler does

        trainer.discriminator.register_forward_hook(signal_during_the_first_step)
        caplog.clear()
        with caplog.at_level("WARNING", logger="hpcgan"):
            assert trainer.fit() == EXIT_INTERRUPTED
        assert "during start-up: nothing new to save" in caplog.text
        assert CheckpointManager(out / "checkpoints", keep=3).complete_steps() == before


@pytest.mark.parametrize("reader", ["webdataset", "dali"])
def test_resume_mid_epoch_from_shards_is_bit_exact(tmp_path, reader):
    """Streaming readers too: the resumed run draws the same batches and the same noise."""
    if reader == "dali":
        pytest.importorskip("nvidia.dali")
    make_shards(tmp_path / "shards", n_train=40, sizes=(64,), shard_size=16)  # 5 batches of 8 an epoch
    settings = (f"data.reader={reader}", "data.workers=1", "checkpoint.every=3", "train.steps=8")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert make_trainer(tmp_path / "shards", straight, *settings).fit() == 0
    assert make_trainer(tmp_path / "shards", resumed, *settings[:-1], "train.steps=4").fit() == 0  # mid-epoch
    assert make_trainer(tmp_path / "shards", resumed, *settings).fit() == 0
    assert_identical(final_weights(resumed), final_weights(straight))


def test_incomplete_checkpoint_is_ignored_and_previous_used(image_folder, tmp_path, reference_run):
    out = tmp_path / "run"
    assert make_trainer(image_folder, out, "train.steps=20", "checkpoint.every=5").fit() == 0
    ckpts = out / "checkpoints"
    (ckpts / "step-0000020" / MARKER).unlink()  # as if killed before the commit
    shutil.copytree(ckpts / "step-0000015", ckpts / "step-0000025")  # looks newer, but a file is cut short
    model = ckpts / "step-0000025" / "model.pt"
    model.write_bytes(model.read_bytes()[:100])
    (ckpts / ".tmp-step-0000030").mkdir()  # a crashed save's leftovers
    assert CheckpointManager(ckpts, keep=3).latest() == ckpts / "step-0000015"
    assert make_trainer(image_folder, out, "train.steps=40", "checkpoint.every=5").fit() == 0
    assert_identical(final_weights(out), reference_run)
    assert not (ckpts / ".tmp-step-0000030").exists()


def test_keep_last_k_plus_milestones(image_folder, tmp_path):
    out = tmp_path / "run"
    trainer = make_trainer(image_folder, out, "train.steps=12", "checkpoint.every=2", "checkpoint.keep=2",
                           "checkpoint.milestones=[4]")
    assert trainer.fit() == 0
    assert CheckpointManager(out / "checkpoints", keep=2).complete_steps() == [4, 10, 12]


def test_rerun_of_a_finished_run_does_nothing(image_folder, tmp_path, caplog):
    out = tmp_path / "run"
    assert make_trainer(image_folder, out, "train.steps=4").fit() == 0
    before = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")}
    caplog.set_level("INFO")
    assert make_trainer(image_folder, out, "train.steps=4").fit() == 0
    assert "already at step 4 of 4: nothing to do" in caplog.text
    assert before == {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")}


def test_epochs_derive_steps(image_folder, tmp_path):
    trainer = make_trainer(image_folder, tmp_path / "run", "train.epochs=2")
    assert trainer.total_steps == 2 * (48 // 8)


def test_bf16_autocast_trains_on_cpu(image_folder, tmp_path):
    fp32 = make_trainer(image_folder, tmp_path / "fp32", "train.steps=3", "train.ema=false",
                        'train.mixed_precision="no"')
    bf16 = make_trainer(image_folder, tmp_path / "bf16", "train.steps=3", "train.ema=false",
                        "train.mixed_precision=bf16")
    start = {k: v.clone() for k, v in bf16.generator.state_dict().items()}
    assert fp32.fit() == 0 and bf16.fit() == 0
    w32, w16 = final_weights(tmp_path / "fp32"), final_weights(tmp_path / "bf16")
    assert all(torch.isfinite(v.float()).all() for v in w16.values())
    moved = [k for k, v in start.items() if v.is_floating_point() and not torch.equal(v, w16[f"G.{k}"])]
    assert moved, "bf16 run did not update G"
    # autocast really ran in bf16: results differ from fp32 in the low bits
    assert any(not torch.equal(w32[k], w16[k]) for k in w32 if w32[k].is_floating_point())


def test_load_generator_and_sample_cli(image_folder, tmp_path):
    out = tmp_path / "run"
    assert make_trainer(image_folder, out, "train.steps=3").fit() == 0
    g = hpcgan.load_generator(out)
    assert not g.training
    with torch.no_grad():
        x = g(torch.randn(2, 100))
    assert x.shape == (2, 1, 64, 64) and x.abs().max() <= 1
    raw = hpcgan.load_generator(out / "checkpoints" / "step-0000003", ema=False)
    assert any(not torch.equal(a, b) for a, b in zip(g.state_dict().values(), raw.state_dict().values()))
    assert main(["sample", "--run", str(out), "--n", "5", "--out", str(tmp_path / "png")]) == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir())[-1] == "sample-000004.png"


# ---------------------------------------------------------------- bad input: one clear line each
def train_cli(capsys, data, out, *extra):
    code = main(train_args(data, out, *extra))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_missing_and_empty_data(capsys, tmp_path):
    code, err = train_cli(capsys, tmp_path / "nope", tmp_path / "run")
    assert code == 2 and "nope: data path does not exist" in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    code, err = train_cli(capsys, tmp_path / "empty", tmp_path / "run")
    assert code == 2 and "empty: no images found" in err


def test_corrupt_and_mixed_size_images(capsys, tmp_path):
    from helpers import write_image_folder
    data = write_image_folder(tmp_path / "d", n=4)
    (data / "slice_0002.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    code, err = train_cli(capsys, data, tmp_path / "run")
    assert code == 2 and "slice_0002.png: cannot decode image" in err
    data = write_image_folder(tmp_path / "m", n=3)
    write_image_folder(tmp_path / "m" / "big", n=1, size=128)
    code, err = train_cli(capsys, data, tmp_path / "run")
    assert code == 2 and "size 64x64 differs from 128x128 of" in err and "big/slice_0000.png" in err


def test_wrong_resolution_and_bad_key(capsys, image_folder, tmp_path):
    code, err = train_cli(capsys, image_folder, tmp_path / "run", "model.resolution=128")
    assert code == 2 and "set model.resolution=64" in err
    code, err = train_cli(capsys, image_folder, tmp_path / "run", "train.lrr=1")
    assert code == 2 and "unknown config key 'train.lrr'" in err


def test_foreign_checkpoint_is_refused_without_damage(capsys, image_folder, tmp_path):
    out = tmp_path / "run"
    assert make_trainer(image_folder, out, "train.steps=2").fit() == 0
    # a different architecture asked for in the same folder
    code, err = train_cli(capsys, image_folder, out, "train.steps=4", "model.ngf=16")
    assert code == 2 and "model.ngf=16 but checkpoint" in err
    # weights that do not belong to the saved config
    ckpt = out / "checkpoints" / "step-0000002"
    (ckpt / "config.yaml").unlink()
    marker = json.loads((ckpt / MARKER).read_text())
    del marker["files"]["config.yaml"], marker["digests"]["config.yaml"]
    (ckpt / MARKER).write_text(json.dumps(marker))
    other = tmp_path / "other"
    assert make_trainer(image_folder, other, "train.steps=1", "model.nz=50").fit() == 0
    shutil.copy(other / "checkpoints" / "step-0000001" / "model.pt", ckpt / "model.pt")
    marker["files"]["model.pt"] = (ckpt / "model.pt").stat().st_size  # committed as if it belonged here
    marker["digests"]["model.pt"] = file_hash((ckpt / "model.pt").read_bytes())
    (ckpt / MARKER).write_text(json.dumps(marker))
    code, err = train_cli(capsys, image_folder, out, "train.steps=4")
    assert code == 2 and "does not match this model" in err and "step-0000002" in err
    assert (ckpt / "model.pt").exists()


def test_auto_precision_is_bf16_where_native_else_fp16_on_gpus_and_fp32_on_cpus(image_folder, tmp_path):
    assert resolve_mixed_precision("auto", "cuda", bf16_native=True) == "bf16"
    assert resolve_mixed_precision("auto", "cuda", bf16_native=False) == "fp16"
    assert resolve_mixed_precision("auto", "cpu", bf16_native=True) == "bf16"
    assert resolve_mixed_precision("auto", "cpu", bf16_native=False) == "no"
    assert resolve_mixed_precision("bf16", "cpu") == "bf16"  # an explicit choice is kept
    assert resolve_mixed_precision("no", "cpu", bf16_native=True) == "no"
    if not torch.cuda.is_available():
        trainer = make_trainer(image_folder, tmp_path / "run", "train.mixed_precision=auto")
        expected = "bf16" if native_bf16(torch.device("cpu")) else "no"
        assert trainer.cfg.train.mixed_precision == "auto" and trainer.acc.mixed_precision == expected


def test_fp16_on_cpu_is_refused_with_the_alternative(capsys, image_folder, tmp_path):
    # Accelerate has no loss scaler on CPU, and fp16 without one underflows: bf16 is the CPU choice.
    code, err = train_cli(capsys, image_folder, tmp_path / "run", "train.mixed_precision=fp16")
    assert code == 2 and "fp16 needs a CUDA GPU" in err and "bf16" in err
