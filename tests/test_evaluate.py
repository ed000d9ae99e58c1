"""Metrics on a trained run: in the loop (curves, best/) and `hpcgan evaluate` (metrics.json, MLflow)."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from hpcgan.cli import main
from hpcgan.train.checkpoint import is_complete

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


def test_evaluate_cli_writes_metrics_json_and_logs_to_the_run(evaluated_run, image_folder, tmp_path, capsys):
    trainer, out, tmp = evaluated_run
    weights = save_script(TinyInception, tmp_path / "inception.pt")
    code = main(["evaluate", "--run", str(out), "--data", str(image_folder), "--n", "24",
                 "--metrics", "swd,fid,kid,pr,msssim,memorization", "--inception-weights", str(weights)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "metrics.json").read_text())
    assert report["step"] == 6 and report["fid"] > 0 and "kid" in report
    assert 0 <= report["precision"] <= 1 and report["pr_feature_space"]
    assert 0 <= report["memorization"] <= 1 and report["swd"] > 0
    assert (out / "evaluation").is_dir()
    run = MlflowClient(f"sqlite:///{tmp / 'db'}").get_run(trainer.state.mlflow_run_id)
    assert run.data.metrics["eval/fid"] == pytest.approx(report["fid"])


def test_evaluate_without_weights_skips_fid_with_a_reason(evaluated_run, image_folder, capsys, monkeypatch):
    monkeypatch.delenv("HPCGAN_INCEPTION_WEIGHTS", raising=False)
    _, out, _ = evaluated_run
    assert main(["evaluate", "--run", str(out), "--data", str(image_folder), "--n", "16", "--metrics", "fid,swd"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert "fid" not in report and "weights" in report["fid_skipped"] and report["swd"] > 0
    assert main(["evaluate", "--run", str(out), "--metrics", "nope"]) == 2
    assert "unknown metric(s) nope" in capsys.readouterr().err
