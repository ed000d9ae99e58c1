"""launch/submit.py's defaults from the partition, and --dry-run against the real local SLURM's sinfo."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from helpers import REPO, cli_env
from hpcgan.launch.slurm_info import NodeShape, SinfoError, gres_gpus, parse_sinfo
from hpcgan.launch.submit import build_parser, resolve_resources


@pytest.mark.parametrize("gres, gpus", [
    ("gpu:a100:4(S:0-1)", 4), ("gpu:h100:8(S:0-1),mps:400", 8), ("gpu:a100:4(S:0,2-3)", 4), ("gpu:2,shard:8", 2),
    ("gpu:a100:2,gpu:v100:2", 4), ("gpu", 1), ("gpu:a100", 1), ("(null)", 0), ("mps:100", 0), ("", 0),
])
def test_gpus_per_node_from_sinfo_gres(gres, gpus):
    assert gres_gpus(gres) == gpus


SINFO = "cpu*|(null)|64\ngpu|gpu:a100:4(S:0-1)|128\ngpu|gpu:a100:8(S:0-1)|256\nmixed|gpu:2|32+\n"


def test_partition_shape_is_its_smallest_node():
    assert parse_sinfo(SINFO, None) == NodeShape("cpu", 0, 64)  # the default partition is marked *
    assert parse_sinfo(SINFO, "gpu") == NodeShape("gpu", 4, 128)
    assert parse_sinfo(SINFO, "mixed") == NodeShape("mixed", 2, 32)
    with pytest.raises(SinfoError, match=r"no such partition 'x' \(this cluster has: cpu, gpu, mixed\)"):
        parse_sinfo(SINFO, "x")


def opts(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_defaults_follow_the_partition():
    gpu, cpu = NodeShape("gpu", 4, 128), NodeShape("cpu", 0, 64)
    res = resolve_resources(opts(), gpu)
    assert (res.gpus, res.tasks, res.cpus, res.note) == (4, 4, 32, "")
    res = resolve_resources(opts(), cpu)
    assert (res.gpus, res.tasks, res.cpus) == (0, 1, 64)
    assert res.note == "partition cpu has no GPUs (sinfo GRES): training on CPU, gloo"
    res = resolve_resources(opts("--tasks-per-node", "4"), cpu)
    assert (res.tasks, res.cpus) == (4, 16)
    res = resolve_resources(opts("--gpus-per-node", "2", "--cpus-per-task", "6"), gpu)  # given wins
    assert (res.gpus, res.tasks, res.cpus, res.note) == (2, 2, 6, "")
    res = resolve_resources(opts(), None)  # local executor: nothing to ask
    assert (res.gpus, res.tasks, res.cpus) == (0, 1, None)


@pytest.mark.slurm
def test_dry_run_prints_the_script_and_submits_nothing(slurm_cluster, image_folder, tmp_path):
    def dry(*launch: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(REPO / "launch" / "submit.py"), "--cluster", "slurm", "--dry-run", *launch, "--",
               "--data", str(image_folder), "--out", str(tmp_path / "run")]
        return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=120, cwd=tmp_path)

    queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    node_cpus = int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()[0])
    proc = dry("--tasks-per-node", "2", "--mem", "1G")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "partition debug has no GPUs (sinfo GRES): training on CPU, gloo"  # the local cluster's
    for expected in (f"#SBATCH --cpus-per-task={max(node_cpus // 2, 1)}", "#SBATCH --ntasks-per-node=2",
                     "#SBATCH --requeue", "#SBATCH --mem=1GB", "#SBATCH --signal=USR2@120",
                     f"export SRUN_CPUS_PER_TASK={max(node_cpus // 2, 1)}", "# dry run: nothing submitted"):
        assert expected in lines, (expected, proc.stdout)
    srun = lines[lines.index("# srun line:") + 1]
    assert srun.startswith("srun ") and "--kill-on-bad-exit=1" in srun and "submitit.core._submit" in srun
    assert not any(line.startswith("#SBATCH --gres") for line in lines)

    proc = dry("--gpus-per-node", "2", "--cpus-per-task", "3", "--no-requeue", "--partition", "high")
    assert proc.returncode == 0, proc.stderr
    # A real submission would be refused (a CPU partition); the dry run says why and still shows the job.
    assert "doctor: fail partition: high has 0 GPU(s) per node, 2 requested" in proc.stderr
    lines = proc.stdout.splitlines()
    for expected in ("#SBATCH --gres=gpu:2", "#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=3",
                     "#SBATCH --no-requeue", "#SBATCH --partition=high", "export SRUN_CPUS_PER_TASK=3"):
        assert expected in lines, (expected, proc.stdout)
    assert "has no GPUs" not in proc.stdout  # asked for explicitly: no note

    assert not (tmp_path / "run").exists()
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == queued
