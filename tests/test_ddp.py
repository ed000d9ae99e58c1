"""Two real processes over gloo: DDP with BatchNorm in D run on real and fake batches."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from contextlib import ExitStack

import pytest

from helpers import (REPO, TINY, assert_identical, cli_env, ddp_report, final_weights, free_port, hpcgan_cmd, torchrun,
                     train_args)

pytestmark = pytest.mark.slow


def test_ranks_hold_equal_weights_after_every_step(image_folder, tmp_path):
    report = ddp_report(tmp_path / "run", 5, f"data.path={image_folder}", *TINY)
    assert len(report) == 10 and all(r["equal"] for r in report)
    norms = [r["norm"] for r in report if r["net"] == "G"]
    assert len(set(norms)) == 5, "G did not change between steps"


def test_ddp_checkpoint_and_resume_is_exact(image_folder, tmp_path):
    sets = [a for kv in [*TINY, "checkpoint.every=3"] for a in ("--set", kv)]

    def train(out, steps):
        proc = torchrun(2, "-m", "hpcgan", "train", "--data", str(image_folder), "--out", str(out),
                        "--set", f"train.steps={steps}", *sets)
        assert proc.returncode == 0, proc.stderr[-3000:]

    train(tmp_path / "straight", 8)
    train(tmp_path / "resumed", 5)
    ckpt = tmp_path / "resumed" / "checkpoints" / "step-0000005"
    assert sorted(p.name for p in ckpt.glob("rank-*.pt")) == ["rank-00000.pt", "rank-00001.pt"]
    train(tmp_path / "resumed", 8)
    assert_identical(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "straight"))


def test_interrupted_ranks_save_and_exit_75(image_folder, tmp_path):
    """Two `hpcgan train` processes wired as srun wires them (rank 0 hosts the rendezvous store), both sent
    SIGUSR1: each saves, leaves the group and exits 75 through the CLI's fast exit, none aborts."""
    out, port = tmp_path / "run", str(free_port())
    args = train_args(image_folder, out, "train.steps=100000", "train.sync_every=1", "checkpoint.every=2",
                      "train.log_every=1000")
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    with ExitStack() as stack:
        procs = []
        for rank, log in enumerate(logs):
            env = cli_env(OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            procs.append(subprocess.Popen(hpcgan_cmd(*args), env=env, stdout=subprocess.DEVNULL,
                                          stderr=stack.enter_context(log.open("w"))))
            stack.callback(procs[-1].kill)
        deadline = time.monotonic() + 240
        while not list(out.glob("checkpoints/step-*/COMPLETE")):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
            time.sleep(0.2)
        for proc in procs:
            proc.send_signal(signal.SIGUSR1)
        codes = [proc.wait(timeout=240) for proc in procs]
    text = "".join(log.read_text() for log in logs)
    assert codes == [75, 75], text[-3000:]
    assert "terminate called" not in text
    saved = json.loads(sorted(out.glob("checkpoints/step-*/state.json"))[-1].read_text())
    assert saved["step"] >= 2 and saved["world_size"] == 2


def test_a_late_rank_is_named_within_the_timeout(image_folder, tmp_path):
    """Rank 1 stalls 60 s before a cross-rank check; with train.dist_timeout_s=4 rank 0 leaves after 4 s with
    one line naming rank 1, and the job ends (torchrun stops rank 1) without waiting out the stall."""
    start = time.monotonic()
    proc = torchrun(2, str(REPO / "tests" / "late_rank_worker.py"), "60",
                    *train_args(image_folder, tmp_path / "run", "train.steps=6", "train.sync_every=1",
                                "train.dist_timeout_s=4"), timeout=120)
    took = time.monotonic() - start
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("hpcgan train: error: rank 1 of")]
    assert lines == ["hpcgan train: error: rank 1 of 2 did not reach the cross-rank check within "
                     "train.dist_timeout_s=4 s: see that rank's log (hung, crashed or stalled on I/O); raise "
                     "train.dist_timeout_s if it is only slow"], proc.stderr[-3000:]
    assert took < 60, f"the job waited {took:.0f} s: it sat out the stalled rank"
