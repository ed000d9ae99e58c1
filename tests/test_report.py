"""`hpcgan report`: the page of a tiny run, opened in a real headless Chromium, and its missing pieces."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from hpcgan.cli import main
from hpcgan.data import shards
from hpcgan.report import write_report
from hpcgan.train.run_folder import RunFolder

from data_factories import make_shards
from helpers import make_trainer

HEADINGS = ["Summary", "Losses and D outputs", "Quality metrics", "Throughput and restarts", "Samples",
            "Real and generated", "Evaluation", "Downstream utility", "Data", "Config"]
DATA_URI = '<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"'


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium. Skipped where it is missing, except in CI, where tests/run.sh installs it and a
    missing browser is a failure, not a silent skip."""
    path = shutil.which("chromium")
    if path is None:
        why = "chromium not installed; install it: apt-get install chromium (tests/run.sh does)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return path


def browse(chromium: str, page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on `page` with a fresh profile and no background network; console messages go
    to stderr as `...:CONSOLE:...` lines."""
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args, page.resolve().as_uri()],
        capture_output=True, text=True, timeout=180)


def write_utility_report(run: RunFolder) -> None:
    """A utility.json as `hpcgan evaluate --utility` writes it (its own test trains the classifiers), and its plot."""
    from hpcgan.evaluate import plot_utility

    arms = {arm: {score: {"mean": 0.5 + 0.1 * i, "std": 0.01, "values": [0.5 + 0.1 * i] * 3}
                  for score in ("accuracy", "balanced_accuracy", "auc")}
            for i, arm in enumerate(("real", "synthetic", "real+synthetic", "real+augment"))}
    report = {"step": 6, "classes": ["axial", "coronal"], "seeds": [0, 1, 2], "steps": 300, "synthetic_ratio": 1.0,
              "arms": arms, "generated_class_accuracy": {"axial": {"mean": 0.9, "std": 0.02, "values": [0.9] * 3}}}
    run.utility_report.write_text(json.dumps(report))
    plot_utility(report, run.utility_plot)


@pytest.fixture(scope="module")
def full_run(image_folder, tmp_path_factory):
    """A tiny run with in-loop metrics, sample grids and `hpcgan evaluate` results, and its report. The
    MLflow run it names is written by hand: test_tracking.py covers the trainer's own."""
    out = tmp_path_factory.mktemp("report") / "run"
    assert make_trainer(image_folder, out, "train.steps=6", "metrics.every=2", "metrics.n=24",
                        "train.sample_every=2").fit() == 0
    assert main(["evaluate", "--run", str(out), "--n", "24", "--metrics", "swd,memorization,c2st"]) == 0
    RunFolder(out).write_tracking("0123456789abcdef", "sqlite:///mlflow.db", "report")
    write_utility_report(RunFolder(out))
    return write_report(out), "0123456789abcdef"


def test_report_opens_in_chromium_with_every_section(chromium, full_run, tmp_path):
    page, run_id = full_run
    assert page == RunFolder(page.parents[1]).report / "report.html"
    assert sorted(p.name for p in page.parent.glob("*.png")) == ["quality.png", "throughput.png", "training.png"]
    text = page.read_text()
    assert not re.search(r'\b(src|href)="(?!data:)', text), "the page must not load anything from outside"
    assert "<script" not in text and "<link" not in text

    loaded = browse(chromium, page, tmp_path / "profile-dom", "--dump-dom")
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    console = [line for line in loaded.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    dom = loaded.stdout
    for heading in HEADINGS:
        assert f"<h2>{heading}</h2>" in dom
    images = re.findall(DATA_URI, dom)
    # 3 plots, 3 sample grids, real held-out beside the newest grid, the pairs, the utility plot
    assert len(images) == 10 and len(re.findall(r"<img ", dom)) == 10
    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    assert [f"step {s}" for s in (2, 4, 6)] == re.findall(r"<figcaption>(step \d+)</figcaption>", dom)
    assert "Memorization audit: closest pairs" in dom and run_id in dom
    eye = dom.split("<h2>Real and generated</h2>")[1].split("<h2>")[0]
    assert re.search(r"Classifier two-sample test: [01]\.\d{3}</b> \(real floor, training vs held-out slices: "
                     r"0\.\d{3}\)", eye), eye[:500]
    shown = [Image.open(io.BytesIO(base64.b64decode(d))) for d in re.findall(DATA_URI, eye)]
    assert [c for c in re.findall(r"<figcaption>([^<]*)</figcaption>", eye)] == [
        "real held-out slices", "generated, newest (step 6)"]
    assert len(shown) == 3 and shown[0].size == shown[1].size  # real grid as large as the generated one, the pairs
    utility = dom.split("<h2>Downstream utility</h2>")[1].split("<h2>")[0]
    assert "<td>real+synthetic</td><td>0.700 ± 0.010</td>" in utility and "<td>axial</td><td>0.900 ± 0.020</td>" in utility
    assert len(re.findall(DATA_URI, utility)) == 1
    assert "floor: train vs held-out" in dom and "not a shard folder" in dom
    assert "plotted against step" not in dom  # the metrics log carries wall-clock time

    shot = tmp_path / "shot.png"
    taken = browse(chromium, page, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2000")
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    pixels = Image.open(shot).convert("RGB")
    assert pixels.size == (1280, 2000)
    gray = pixels.convert("L")
    non_white = sum(gray.histogram()[:240]) / (gray.width * gray.height)
    colors = pixels.getcolors(maxcolors=1 << 24)
    assert non_white > 0.02 and len(colors) > 200, (non_white, len(colors))


def test_report_of_a_run_without_eval_records_says_what_is_missing(tmp_path, capsys):
    data = tmp_path / "shards"
    make_shards(data, n_train=24, n_val=8, sizes=(64,))
    manifest = shards.read_manifest(data)
    manifest.update(split={"method": "subject", "val_frac": 0.25},
                    contrasts={"train": {"T1w": 24}, "val": {"T1w": 8}})
    shards.write_manifest(data, manifest)
    out = tmp_path / "run"
    assert make_trainer(data, out, "train.steps=2").fit() == 0
    page = tmp_path / "elsewhere" / "page.html"
    assert main(["report", "--run", str(out), "--out", str(page)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {page}"
    text = page.read_text()
    assert sorted(p.name for p in page.parent.glob("*.png")) == ["throughput.png", "training.png"]
    assert "not available: no eval/* records in the metrics log" in text
    assert re.findall(r"<figcaption>(step \d+)</figcaption>", text) == ["step 2"]  # the final grid
    assert "not available: no metrics.json" in text
    assert "not available: no MLflow run recorded" in text
    assert "<td>train</td><td>24</td>" in text and "T1w 24" in text and "method subject" in text


def test_report_marks_restarts_over_wall_time_and_picks_evenly_spaced_grids(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.samples.mkdir(parents=True)
    for step in range(1, 11):
        Image.new("L", (8, 8), step * 20).save(run.sample_grid(step))
        run.append_metrics({"step": step, "images_seen": 8 * step, "loss_d": 1.0, "loss_g": 1.0,
                            "images_per_s": 100.0 + step, "time": 1e9 + 30 * step, "restarts": int(step > 5)})
    text = write_report(run.root).read_text()
    assert re.findall(r"<figcaption>step (\d+)</figcaption>", text) == ["1", "2", "4", "5", "6", "7", "9", "10"]
    assert "Restarts: 1 (at step 6), marked in red." in text
    assert "plotted against step" not in text
    assert "not available: no record in the metrics log has losses" not in text
    assert "not available: no saved config" in text


def test_a_bare_metrics_log_gives_a_page_of_not_available_lines(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    run.append_metrics({"step": 0, "images_seen": 0, "compile_s": 1.5})
    page = write_report(run.root)
    text = page.read_text()
    assert [h for h in HEADINGS if f"<h2>{h}</h2>" in text] == HEADINGS
    # every section but the summary; "Real and generated" once for each of its three parts
    assert text.count('<p class="na">not available: ') == len(HEADINGS) - 1 + 2
    assert "data:image" not in text and not list(page.parent.glob("*.png"))


def test_a_missing_run_folder_or_metrics_log_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["report", "--run", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"hpcgan report: error: {missing}: no such run folder; pass the --out folder of hpcgan train as --run"
    assert main(["report", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{tmp_path}: no metrics log (metrics.jsonl)" in err


def test_real_grid_of_a_conditional_run_has_the_generated_grids_classes_in_place(tmp_path):
    """Each tile of the real grid shows a held-out slice of the class the generated grid has in that place."""
    import numpy as np
    import torch

    from hpcgan.data import load_labelled
    from hpcgan.report import _real_grid
    from hpcgan.train.samples import grid_labels, save_grid

    make_shards(tmp_path / "shards", n_train=12, n_val=30, sizes=(64,), classes=("a", "b", "c"))
    generated = save_grid(torch.zeros(64, 1, 64, 64), tmp_path / "grid.png").read_bytes()
    config = {"data": {"path": str(tmp_path / "shards")}, "model": {"resolution": 64, "conditional": 3}}
    grid = np.asarray(Image.open(io.BytesIO(_real_grid(config, generated))))
    assert grid.shape == Image.open(io.BytesIO(generated)).size[::-1]
    images, labels, _ = load_labelled(tmp_path / "shards", "val", 64)
    for i, wanted in enumerate(grid_labels(64, 3).tolist()):
        r, c = divmod(i, 8)
        tile = torch.from_numpy(grid[2 + r * 66:2 + r * 66 + 64, 2 + c * 66:2 + c * 66 + 64].copy())
        match = (images[:, 0] == tile).flatten(1).all(dim=1).nonzero()[:, 0]
        assert len(match) and int(labels[match[0]]) == wanted, i
