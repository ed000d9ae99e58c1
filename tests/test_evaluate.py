"""Metrics on a trained run: in the loop (curves, best/) and `hpcgan evaluate` (metrics.json, MLflow)."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from mlflow.tracking import MlflowClient

from hpcgan.cli import main
from hpcgan.evaluate import generated_labels
from hpcgan.train.checkpoint import CheckpointManager, is_complete
from hpcgan.train.signals import EXIT_INTERRUPTED

from helpers import make_trainer
from test_metrics import TinyInception, save_script

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def evaluated_run(image_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    out = tmp / "run"
    trainer = make_trainer(image_folder, out, "train.steps=6", "metrics.every=2", "metrics.n=24",
                           "track.enabled=true", f"track.uri=sqlite:///{tmp / 'db'}", "track.experiment=eval")
    assert trainer.fit() == 0
    return trainer, out, tmp


def test_in_loop_metrics_are_logged_and_best_is_kept(evaluated_run):
    trainer, out, tmp = evaluated_run
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curves = [r for r in logged if "eval/swd" in r]
    assert [r["step"] for r in curves] == [2, 4, 6]
    assert all(r["eval/swd"] > 0 and 0 < r["eval/msssim"] <= 1 for r in curves), curves
    best = trainer.state.best
    assert best["metric"] == "swd" and best["value"] == min(r["eval/swd"] for r in curves)
    assert is_complete(out / "best")
    assert json.loads((out / "best" / "state.json").read_text())["step"] == best["step"]
    history = MlflowClient(f"sqlite:///{tmp / 'db'}").get_metric_history(trainer.state.mlflow_run_id, "eval/swd")
    assert [m.step for m in history] == [2, 4, 6]


def eval_steps(out) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval/swd" in r]


def test_last_step_evaluates_when_not_a_multiple_of_every(image_folder, tmp_path):
    """5 steps, metrics every 2 (and a run shorter than metrics.every): the last step has its numbers too."""
    assert make_trainer(image_folder, tmp_path / "a", "train.steps=5", "metrics.every=2", "metrics.n=24").fit() == 0
    assert eval_steps(tmp_path / "a") == [2, 4, 5]
    assert make_trainer(image_folder, tmp_path / "b", "train.steps=3", "metrics.every=500", "metrics.n=24").fit() == 0
    assert eval_steps(tmp_path / "b") == [3]


@pytest.mark.parametrize("on_interrupt", [True, False])
def test_interrupted_run_evaluates_its_saved_step(image_folder, tmp_path, on_interrupt):
    """A signal after step 3 (metrics every 2): step 3 is saved, then evaluated unless metrics.on_interrupt is off."""
    out = tmp_path / "run"
    trainer = make_trainer(image_folder, out, "train.steps=20", "metrics.every=2", "metrics.n=24",
                           f"metrics.on_interrupt={str(on_interrupt).lower()}")

    def signal_after_step_3(module, inputs, output):
        if trainer.state.step == 3 and module.training:
            trainer.interrupt.signum = signal.SIGUSR1  # what the installed handler does

    trainer.generator.register_forward_hook(signal_after_step_3)
    assert trainer.fit() == EXIT_INTERRUPTED
    assert CheckpointManager(out / "checkpoints", keep=3).complete_steps()[-1] == 3
    assert eval_steps(out) == ([2, 3] if on_interrupt else [2])


def test_evaluate_cli_writes_metrics_json_and_logs_to_the_run(evaluated_run, image_folder, tmp_path, capsys):
    trainer, out, tmp = evaluated_run
    weights = save_script(TinyInception, tmp_path / "inception.pt")
    code = main(["evaluate", "--run", str(out), "--data", str(image_folder), "--n", "24",
                 "--metrics", "swd,fid,kid,pr,msssim,memorization,c2st", "--inception-weights", str(weights)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "metrics.json").read_text())
    assert report["step"] == 6 and report["fid"] > 0 and "kid" in report
    assert 0 <= report["precision"] <= 1 and report["pr_feature_space"]
    assert 0 <= report["memorization"] <= 1 and report["swd"] > 0
    assert (out / "evaluation").is_dir()
    run = MlflowClient(f"sqlite:///{tmp / 'db'}").get_run(trainer.state.mlflow_run_id)
    assert run.data.metrics["eval/fid"] == pytest.approx(report["fid"])
    assert 0 <= report["c2st"] <= 1 and 0 <= report["floor/c2st"] <= 1 and report["c2st_seconds"] > 0
    assert run.data.metrics["eval/c2st"] == pytest.approx(report["c2st"])
    assert "floor/c2st_seconds" not in report  # a cost has no floor


def test_evaluate_without_weights_skips_fid_with_a_reason(evaluated_run, image_folder, capsys, monkeypatch):
    monkeypatch.delenv("HPCGAN_INCEPTION_WEIGHTS", raising=False)
    _, out, _ = evaluated_run
    assert main(["evaluate", "--run", str(out), "--data", str(image_folder), "--n", "16", "--metrics", "fid,swd"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert "fid" not in report and "weights" in report["fid_skipped"] and report["swd"] > 0
    assert main(["evaluate", "--run", str(out), "--metrics", "nope"]) == 2
    assert "unknown metric(s) nope" in capsys.readouterr().err


def test_a_conditional_runs_generated_set_has_every_class_in_any_prefix() -> None:
    """SWD and precision/recall read the first len(real) generated slices; 10000 generated against 106
    held-out ones (the quickstart) must not all be of the first class."""
    counts = [270, 379, 109]
    labels = generated_labels(10000, counts, seed=0)
    assert torch.bincount(labels).tolist() == [3562, 5000, 1438]  # the training proportions, exactly
    head = torch.bincount(labels[:106], minlength=3) / 106
    share = torch.tensor(counts) / sum(counts)
    assert ((head - share).abs() < 0.1).all(), head
    assert torch.equal(labels, generated_labels(10000, counts, seed=0))
    assert not torch.equal(labels, generated_labels(10000, counts, seed=1))
