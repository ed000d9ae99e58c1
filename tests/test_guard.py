"""The divergence guard: non-finite steps are skipped and counted on the device, runaway or diverging runs
roll back to the last good checkpoint with a lower learning rate, and give up (exit 1) when that keeps
failing; a healthy run is bit-identical with the guard on and off."""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest
import torch

from hpcgan.cli import main
from hpcgan.config import ConfigError, build_config
from hpcgan.train.checkpoint import CheckpointManager, load_torch
from hpcgan.train.guard import Guard

from helpers import assert_identical, final_weights, make_trainer, run_cli, train_args


def params(trainer) -> dict[str, torch.Tensor]:
    return {f"{net}.{k}": v.detach().clone() for net, module in (("G", trainer.generator), ("D", trainer.discriminator))
            for k, v in module.named_parameters()}


def adam_steps(trainer) -> list[float]:
    return [float(s["step"]) for opt in (trainer.opt_g, trainer.opt_d) for s in opt.optimizer.state.values()]


def all_finite_checkpoints(run) -> list[str]:
    folders = CheckpointManager(run / "checkpoints", keep=1).step_folders()
    for folder in folders:
        for net, state in load_torch(folder / "model.pt").items():
            assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), f"{folder} {net}"
    return [f.name for f in folders]


def test_injected_nan_step_is_skipped_on_the_device_and_counted(image_folder, tmp_path):
    trainer = make_trainer(image_folder, tmp_path / "run", "train.inject_nan_step=3")
    trainer.step(), trainer.step()
    before, steps_before = params(trainer), adam_steps(trainer)
    trainer.step()  # step 3: NaN losses, so NaN gradients
    assert_identical(params(trainer), before)
    assert adam_steps(trainer) == steps_before == [2.0] * len(steps_before)
    trainer.step()
    assert adam_steps(trainer) == [3.0] * len(steps_before)
    record = {"d_real": 0.5, "d_fake": 0.5}
    assert trainer.guard.read(record, 4) == (1, None) and record["bad_steps"] == 1
    assert trainer.guard.read(record, 4) == (0, None)


def test_injected_nan_run_finishes_with_the_step_logged(image_folder, tmp_path, caplog):
    out = tmp_path / "run"
    trainer = make_trainer(image_folder, out, "train.steps=5", "train.inject_nan_step=3")
    with caplog.at_level(logging.WARNING, logger="hpcgan"):
        assert trainer.fit() == 0
    assert [r.getMessage() for r in caplog.records] == [
        "skipped 1 step(s) with a non-finite loss or gradient up to step 3"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_steps"] for r in records if "bad_steps" in r] == [0, 0, 1, 0, 0]
    assert trainer.state.bad_steps == 1 and trainer.state.rollbacks == 0
    assert all_finite_checkpoints(out) == ["step-0000005"]


def test_bad_streak_rolls_back_with_lower_lr_past_the_bad_data_and_the_state_persists(image_folder, tmp_path,
                                                                                       caplog):
    out = tmp_path / "run"
    settings = ("checkpoint.every=3", "train.inject_nan_step=5", "train.max_bad_steps=1")
    trainer = make_trainer(image_folder, out, "train.steps=8", *settings)
    with caplog.at_level(logging.WARNING, logger="hpcgan"):
        assert trainer.fit() == 0
    rollback = [r.getMessage() for r in caplog.records if "rollback" in r.getMessage()]
    assert len(rollback) == 1 and rollback[0].startswith("rollback 1 of 3 at step 5: 1 steps in a row had a "
                                                         "non-finite loss or gradient (train.max_bad_steps=1); "
                                                         "back to step 3")
    assert "with lr x0.5" in rollback[0]
    assert trainer.state.rollbacks == 1 and trainer.state.lr_factor == 0.5 and trainer.state.step == 8
    assert all(g["lr"] == pytest.approx(1e-4) for g in trainer.opt_g.param_groups)
    # the data went on after step 5's batch: 8 steps + the 2 left behind = 10 batches of 6 an epoch
    assert trainer.reader.state_dict() == {"epoch": 1, "batch": 4}
    saved = json.loads((out / "checkpoints" / "step-0000008" / "state.json").read_text())
    assert saved["rollbacks"] == 1 and saved["lr_factor"] == 0.5
    requeued = make_trainer(image_folder, out, "train.steps=9", *settings)
    assert requeued.fit() == 0
    assert requeued.state.rollbacks == 1 and requeued.state.lr_factor == 0.5
    assert all(g["lr"] == pytest.approx(1e-4) for g in requeued.opt_d.param_groups)


def test_infinite_lr_rolls_back_then_gives_up_with_exit_1(image_folder, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*train_args(image_folder, out, "train.steps=8", "checkpoint.every=2", "train.lr=.inf",
                               "train.max_bad_steps=2", "train.max_rollbacks=2"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("rollback ") == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "giving up at step" in last and "after 2 rollback(s) (train.max_rollbacks=2)" in last
    assert all_finite_checkpoints(out) == []  # every save found non-finite weights and rolled back instead


def test_nan_lr_is_a_one_line_config_error(capsys, image_folder, tmp_path):
    code = main(train_args(image_folder, tmp_path / "run", "train.lr=.nan"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["hpcgan train: error: train.lr=nan: must be a number"]


@pytest.mark.parametrize("override, message", [
    ("train.max_bad_steps=0", "train.max_bad_steps=0: must be >= 1"),
    ("train.rollback_lr_factor=1.5", "train.rollback_lr_factor=1.5: must be in (0, 1]"),
    ("train.max_rollbacks=-1", "train.max_rollbacks=-1: must be >= 0"),
    ("train.inject_nan_step=0", "train.inject_nan_step=0: must be a step >= 1 or null"),
])
def test_guard_keys_are_validated_up_front(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(overrides=[override])


def test_non_finite_weights_are_never_checkpointed(image_folder, tmp_path, caplog):
    trainer = make_trainer(image_folder, tmp_path / "run")
    trainer.step()
    with torch.no_grad():
        next(trainer.discriminator.parameters())[0].fill_(float("inf"))
    with caplog.at_level(logging.WARNING, logger="hpcgan"):
        assert trainer.save_checkpoint() is None
    assert "step 1: weights are not finite, no checkpoint written" in caplog.text
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_divergence_needs_saturated_d_and_a_worse_metric_for_patience_evaluations():
    cfg = build_config(overrides=["train.divergence_patience=2", "train.divergence_margin=0.5"])
    guard = Guard(cfg, torch.device("cpu"), scaled=False)
    saturated, healthy = {"d_real": 0.995, "d_fake": 0.004}, {"d_real": 0.8, "d_fake": 0.2}
    guard.read(dict(saturated), 10)
    assert guard.evaluated(10, 1.4, best=1.0) is None and guard.good_step == 10  # within the margin
    assert guard.evaluated(20, 2.0, best=1.0) is None  # one worse evaluation
    guard.read(dict(healthy), 30)
    assert guard.evaluated(30, 2.0, best=1.0) is None and guard.good_step == 30  # D not saturated: streak ends
    guard.read(dict(saturated), 40)
    assert guard.evaluated(40, 2.0, best=1.0) is None
    why = guard.evaluated(50, 2.5, best=1.0)
    assert why and why.startswith("D saturated") and "for 2 evaluations" in why and guard.good_step == 30


def test_divergence_target_is_the_newest_checkpoint_before_it_else_best(image_folder, tmp_path):
    out = tmp_path / "run"
    assert make_trainer(image_folder, out, "train.steps=6", "checkpoint.every=2").fit() == 0
    manager = CheckpointManager(out / "checkpoints", keep=3, best=out / "best")
    assert manager.latest(at_most=5) == out / "checkpoints" / "step-0000004"
    manager.promote_best(out / "checkpoints" / "step-0000002")
    manager.discard_after(3)
    shutil.rmtree(out / "checkpoints" / "step-0000002")  # pruned
    assert manager.latest(at_most=3) == out / "best"
    assert manager.latest(at_most=1) is None


def test_guard_off_and_on_train_bit_identical_weights(image_folder, tmp_path):
    for guard in ("true", "false"):
        assert make_trainer(image_folder, tmp_path / guard, "train.steps=5", f"train.guard={guard}").fit() == 0
    assert_identical(final_weights(tmp_path / "true"), final_weights(tmp_path / "false"))


def test_rollback_and_bad_steps_reach_mlflow(image_folder, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trainer = make_trainer(image_folder, tmp_path / "run", "train.steps=3", "train.inject_nan_step=2",
                           "train.max_bad_steps=1", "track.enabled=true", f"track.uri={uri}", "track.experiment=g",
                           "track.flush_every_s=0.2", "track.system_metrics_every_s=0")
    assert trainer.fit() == 0 and trainer.state.rollbacks == 1  # back to the initial state: no checkpoint yet
    client = MlflowClient(uri)
    run = client.get_run(trainer.state.mlflow_run_id)
    assert run.data.tags["hpcgan.rollbacks"] == "1"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "rollbacks")] == [1.0]
    assert sum(m.value for m in client.get_metric_history(run.info.run_id, "bad_steps")) == 1.0
