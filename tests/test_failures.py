"""Runs that cannot go wrong silently: a full disk, a signal during start-up, unusable output paths.
Each ends in one line naming the path and the fix, leaves no lock or temp file, and loses no finished work."""

from __future__ import annotations

import resource
import signal
import subprocess
import time

import pytest

from hpcgan.train import EXIT_INTERRUPTED
from hpcgan.train.checkpoint import CheckpointManager
from hpcgan.train.run_folder import RunFolder

from helpers import cli_env, hpcgan_cmd, run_cli, train_args


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return apply


def _limited(args: list[str], limit: int) -> subprocess.CompletedProcess:
    return subprocess.run(hpcgan_cmd(*args), env=cli_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=_file_size_limit(limit))


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def _leftovers(out) -> list[str]:
    """Lock and temp files: what a failed start must not leave."""
    return sorted(p.name for p in out.rglob("*") if p.name.startswith(".") or ".tmp" in p.name)


@pytest.mark.parametrize("limit, path", [(50, ".lock"), (600, "config.yaml")])
def test_full_disk_before_the_first_step_is_one_line_and_leaves_nothing(image_folder, tmp_path, limit, path):
    out = tmp_path / "run"
    last = _one_line_error(_limited(train_args(image_folder, out, "train.steps=2"), limit))
    assert f"{out / path}: " in last and "File too large" in last and "free space" in last
    assert "run the same command again" in last
    assert _leftovers(out) == []
    assert not (out / "config.yaml").exists()  # no truncated config for the next start to trip on


@pytest.mark.slow
def test_full_disk_keeps_the_config_of_the_last_start(image_folder, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*train_args(image_folder, out, "train.steps=2", "checkpoint.every=2")).returncode == 0
    saved = (out / "config.yaml").read_bytes()
    last = _one_line_error(_limited(train_args(image_folder, out, "train.steps=4"), 600))
    assert str(out / "config.yaml") in last
    assert (out / "config.yaml").read_bytes() == saved and _leftovers(out) == []


def test_sample_grid_on_a_full_disk_is_a_warning_and_the_checkpoint_error_names_the_size(image_folder, tmp_path):
    out = tmp_path / "run"
    # 4 kB per file: config and metrics fit, a sample grid (~20 kB) and the first checkpoint do not.
    proc = _limited(train_args(image_folder, out, "train.steps=2", "train.sample_every=1", "checkpoint.every=2"),
                    4000)
    last = _one_line_error(proc)
    assert "sample grid of step 1 not written: " + str(out / "samples") in proc.stderr
    assert "cannot write checkpoint step 2" in last and "no checkpoint yet" in last
    needed = float(last.split("needs about ")[1].split(" MB")[0])
    assert 2.0 < needed < 4.0, last  # DCGAN-8 G + D + EMA weights and Adam moments: 2.9 MB on disk
    assert _leftovers(out) == [] and not list((out / "samples").glob("*"))
    assert len(RunFolder(out).read_metrics()) == 2  # every record whole


def test_too_little_free_space_is_refused_before_training(image_folder, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("a 1 MB file system needs root to mount a tmpfs")
    try:
        out = small / "run"
        proc = run_cli(*train_args(image_folder, out, "train.steps=1"))  # its checkpoint needs 2.9 MB
        last = _one_line_error(proc)
        assert str(out / "checkpoints") in last and "MB free, but one checkpoint needs about 2.9 MB" in last
        assert "step 1/" not in proc.stderr and _leftovers(out) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def _start(args: list[str], log, **env: str) -> subprocess.Popen:
    return subprocess.Popen(hpcgan_cmd(*args), env=cli_env(**env), stdout=subprocess.DEVNULL, stderr=log)


def _wait_for(path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while text not in path.read_text():
        assert proc.poll() is None and time.time() < deadline, path.read_text()[-3000:]
        time.sleep(0.02)


@pytest.mark.slow
def test_a_signal_at_any_moment_of_start_up_exits_resumable(image_folder, tmp_path):
    """SIGTERM while torch imports, while the data and models are built, while floors are computed, and
    while a checkpoint is loaded: always exit 75, no lock left, and the next start trains on. Each start
    has its own cache, so that its floors are computed (about 0.5 s) rather than read (15 ms); a signal
    that lands in the first step instead is a start-up signal too."""
    out, stderr = tmp_path / "run", tmp_path / "stderr.txt"
    floors = ["metrics.every=2", "metrics.n=64", "metrics.names=[swd]"]
    cases = [("import", None, 0.5), ("build", None, 2.5), ("floors", "training on cpu", 0.0),
             ("resume", "resumed from", 0.0)]
    for phase, line, delay in cases:
        if phase == "resume":
            assert run_cli(*train_args(image_folder, out, "train.steps=2", "checkpoint.every=2")).returncode == 0
        with open(stderr, "w") as log:
            proc = _start(train_args(image_folder, out, "train.steps=4", *floors), log,
                          HPCGAN_CACHE=str(tmp_path / f"cache-{phase}"))
            if line is None:
                time.sleep(delay)
            else:
                _wait_for(stderr, line, proc)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=300) == EXIT_INTERRUPTED, (phase, stderr.read_text()[-3000:])
        text = stderr.read_text()
        assert "Traceback" not in text, (phase, text[-3000:])
        assert "step 3/4" not in text, phase
        assert not RunFolder(out).lock_file.exists(), phase
    steps = CheckpointManager(out / "checkpoints", keep=3).complete_steps()
    assert steps == [2]  # start-up signals saved nothing new and lost nothing


@pytest.mark.slow
def test_unusable_tracking_store_and_sample_folder_are_one_line(image_folder, tmp_path):
    missing = tmp_path / "no" / "such" / "mlflow.db"
    last = _one_line_error(run_cli(*train_args(image_folder, tmp_path / "run", "train.steps=1",
                                               "track.enabled=true", f"track.uri=sqlite:///{missing}")))
    assert f"track.uri sqlite:///{missing}: {missing} its folder does not exist" in last
    assert "track.enabled=false" in last and _leftovers(tmp_path / "run") == []

    run = tmp_path / "trained"
    assert run_cli(*train_args(image_folder, run, "train.steps=1")).returncode == 0
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    last = _one_line_error(run_cli("sample", "--run", str(run), "--out", str(a_file), "--n", "4", "--no-audit"))
    assert f"--out {a_file}: an existing file" in last and a_file.read_text() == "keep me"
    last = _one_line_error(run_cli("sample", "--run", str(run), "--out", str(a_file / "sub"), "--n", "4", "--no-audit"))
    assert f"{a_file} is a file" in last
