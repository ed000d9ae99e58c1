"""`python launch/submit.py [cluster options] -- <hpcgan train arguments>`: one run or a sweep on SLURM.

Everything that can be checked before submission is (config, data path, partition, sbatch
reachable), so mistakes cost one line, not a queue wait. The job's arguments are plain strings with
absolute paths; the run folder holds everything else.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hpcgan.config import ConfigError, resolve_tracking_uri
from hpcgan.launch.slurm_info import NodeShape, SinfoError, node_shape

class LaunchError(RuntimeError):
    """A submission that cannot work; the message says what to change."""


def parse_time(text: str) -> int:
    """SLURM time ('24:00:00', '1-12:00:00', '90' minutes, '30:00') -> minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise LaunchError(f"--time {text!r}: use minutes, MM:SS, HH:MM:SS or D-HH:MM:SS")
    days, first, second, third = match.groups()
    if third is not None:
        hours, minutes, seconds = int(first), int(second), int(third)
    elif second is not None:
        hours, minutes, seconds = (int(first), int(second), 0) if days else (0, int(first), int(second))
    else:
        hours, minutes, seconds = (int(first), 0, 0) if days else (0, int(first), 0)
    return max(1, int(days or 0) * 1440 + hours * 60 + minutes + (1 if seconds else 0))


def parse_mem_gb(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", text.strip().upper())
    if not match:
        raise LaunchError(f"--mem {text!r}: use e.g. 64G or 512M")
    scale = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1, "T": 1024, "": 1 / 1024}[match.group(2)]
    return float(match.group(1)) * scale


def sweep_points(sweeps: list[str]) -> list[dict[str, str]]:
    """['train.lr=1e-4,2e-4', 'model.ngf=32,64'] -> the cartesian product as override dicts."""
    axes = []
    for item in sweeps:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise LaunchError(f"--sweep {item!r}: expected key=v1,v2,...")
        axes.append([(key, v) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def point_name(point: dict[str, str]) -> str:
    return "_".join(f"{k.split('.')[-1]}-{v}" for k, v in point.items()) or ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/submit.py", description=__doc__,
                                epilog="Arguments after -- are those of `hpcgan train` (--data, --out, --config, --set).")
    p.add_argument("--cluster", choices=["slurm", "local", "debug"],
                   help="default: slurm when sbatch is reachable, else local (same code path on this machine)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="one task per GPU; default on SLURM: the partition's GPUs per node (sinfo GRES), 0 (CPU) "
                        "where it has none; 0 with --cluster local/debug")
    p.add_argument("--tasks-per-node", type=int, default=None, help="processes per node when no GPUs are used")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--time", default="24:00:00", help="wall-clock limit per job (the run itself may be longer)")
    p.add_argument("--mem", help="memory per node, e.g. 64G")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="default on SLURM: the node's CPUs / tasks per node; handed to srun (SRUN_CPUS_PER_TASK)")
    p.add_argument("--constraint")
    p.add_argument("--exclusive", action="store_true")
    p.add_argument("--array-parallelism", type=int, default=64, help="sweep points running at once")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="one job-array task per combination, each its own run folder and MLflow run")
    p.add_argument("--name", default="hpcgan")
    p.add_argument("--max-requeues", type=int, default=20,
                   help="preemptions/time-outs a run may survive (submitit max_num_timeout)")
    p.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit that SLURM sends the warning signal")
    p.add_argument("--requeue", action=argparse.BooleanOptionalAction, default=True,
                   help="let SLURM requeue the job after preemption or node failure (sbatch --requeue)")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything, print the sbatch script and srun line that would run; submit nothing")
    p.add_argument("--skip-doctor", action="store_true",
                   help="submit without the quick `hpcgan doctor` checks (disk, run folder, MLflow, partition, time)")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=None,
                   help="wait for the job(s) and show the log (default: on for local/debug, off for slurm)")
    return p


def sbatch_reachable() -> bool:
    if not shutil.which("sbatch"):
        return False
    try:
        return subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def partition_shape(partition: str | None) -> NodeShape:
    """The nodes of `partition` (None: the default one), or one line saying why not."""
    try:
        return node_shape(partition)
    except SinfoError as err:
        raise LaunchError(f"--partition {partition}: {err}" if partition else str(err)) from None


@dataclass
class Resources:
    """What each node of the job gets, defaults filled in from the partition."""

    gpus: int  # per node; one task per GPU
    tasks: int  # per node
    cpus: int | None  # per task; None: the executor's default
    note: str = ""  # a default worth saying, in one line


def resolve_resources(opts: argparse.Namespace, shape: NodeShape | None) -> Resources:
    """GPUs from the partition's GRES unless given (0: CPU, said once), CPUs per task from the node's CPUs
    shared by its tasks unless given. `shape` None (local/debug executors): nothing to read, CPU unless given."""
    note = ""
    gpus = opts.gpus_per_node
    if gpus is None:
        gpus = shape.gpus if shape is not None else 0
        if shape is not None and not gpus:
            note = f"partition {shape.partition} has no GPUs (sinfo GRES): training on CPU, gloo"
    tasks = gpus if gpus else (opts.tasks_per_node or 1)
    cpus = opts.cpus_per_task
    if cpus is None and shape is not None:
        cpus = max(shape.cpus // tasks, 1)
    return Resources(gpus, tasks, cpus, note)


@dataclass
class Plan:
    """What will be submitted: one entry of train arguments per run folder."""

    runs: list[tuple[Path, list[str]]]
    experiment: str


def plan_runs(opts: argparse.Namespace, train_argv: list[str]) -> Plan:
    """Validate the training arguments here, where errors are cheap, and make every path absolute."""
    from hpcgan.cli import build_parser as train_parser
    from hpcgan.cli import resolve_data, resolve_train_config

    args = train_parser().parse_args(["train", *train_argv])
    if args.data:
        args.data = str(Path(resolve_data(args.data)).resolve())
    base_out = Path(args.out).resolve()
    track_uri = resolve_tracking_uri("")
    runs, experiment = [], None
    points = sweep_points(opts.sweep)
    for point in points:
        out = base_out / point_name(point) if len(points) > 1 else base_out
        point_args = argparse.Namespace(**{**vars(args), "out": str(out),
                                           "overrides": [*args.overrides, *(f"{k}={v}" for k, v in point.items())]})
        cfg = resolve_train_config(point_args)  # raises ConfigError / DataError with one clear line
        if not Path(cfg.data.path).exists():
            raise LaunchError(f"data path {cfg.data.path} does not exist: pass --data with a real folder")
        experiment = cfg.track.experiment
        argv = ["--out", str(out), *(["--data", args.data] if args.data else []),
                *(x for c in args.config for x in ("--config", str(Path(c).resolve()) if Path(c).exists() else c)),
                *(x for o in point_args.overrides for x in ("--set", o))]
        if not cfg.track.uri:
            argv += ["--set", f"track.uri={track_uri}"]
        runs.append((out, argv))
    return Plan(runs, experiment or "hpcgan")


def run_doctor(opts: argparse.Namespace, plan: Plan, res: Resources) -> None:
    """`hpcgan doctor`'s quick checks of each run: warnings printed, the first failure refuses the submission.
    A dry run prints failures too, and goes on to show the job that was asked for."""
    from hpcgan.doctor import preflight

    checks = preflight([argv for _, argv in plan.runs], slurm=opts.cluster == "slurm", partition=opts.partition,
                       gpus_per_node=res.gpus, nodes=opts.nodes, tasks=res.tasks,
                       time_limit=opts.time)
    for check in checks:
        if check.verdict == "warn" or (check.verdict == "fail" and opts.dry_run):
            print(f"launch/submit.py: doctor: {check.line()}", file=sys.stderr)
    failed = next((c for c in checks if c.verdict == "fail"), None)
    if failed and not opts.dry_run:
        raise LaunchError(f"doctor: {failed.line()} (--skip-doctor submits anyway)")


def make_executor(opts: argparse.Namespace, folder: Path, res: Resources):
    import submitit

    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=opts.cluster,
                                     slurm_max_num_timeout=opts.max_requeues)
    params = dict(name=opts.name, nodes=opts.nodes, tasks_per_node=res.tasks, timeout_min=parse_time(opts.time),
                  slurm_signal_delay_s=opts.signal_delay, slurm_array_parallelism=opts.array_parallelism)
    if res.gpus and opts.cluster == "slurm":
        params["slurm_gres"] = f"gpu:{res.gpus}"  # every SLURM version knows --gres
    elif res.gpus:
        params["gpus_per_node"] = res.gpus  # the local executor sets CUDA_VISIBLE_DEVICES from it
    if res.cpus:
        params["cpus_per_task"] = res.cpus
    if opts.mem:
        params["mem_gb"] = parse_mem_gb(opts.mem)
    slurm_only = {"slurm_partition": opts.partition, "slurm_account": opts.account, "slurm_qos": opts.qos,
                  "slurm_constraint": opts.constraint, "slurm_exclusive": True if opts.exclusive else None}
    params.update({k: v for k, v in slurm_only.items() if v is not None})
    if opts.cluster == "slurm":
        # One rank that fails ends the step instead of leaving the others in a collective until the time
        # limit; since SLURM 22.05 srun no longer inherits --cpus-per-task from sbatch.
        params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
        if res.cpus:
            params["slurm_setup"] = [f"export SRUN_CPUS_PER_TASK={res.cpus}"]
        params["slurm_additional_parameters"] = {"requeue" if opts.requeue else "no_requeue": True}
    executor.update_parameters(**params)
    return executor


def sbatch_script(executor) -> str:
    """The sbatch script submitit would write for one job of `executor` (a SLURM one)."""
    slurm = executor._executor
    return slurm._make_submission_file_text(slurm._submitit_command_str, "dry-run")


def dry_run(opts: argparse.Namespace, plan: Plan, executor) -> None:
    """Print what would be submitted: the sbatch script and its srun line (SLURM), and each run's arguments."""
    if opts.cluster == "slurm":
        script = sbatch_script(executor)
        if len(plan.runs) > 1:
            print(f"# one job array of {len(plan.runs)} tasks (--array=0-{len(plan.runs) - 1}"
                  f"%{min(len(plan.runs), opts.array_parallelism)}), each this script:")
        print(script.rstrip())
        srun = next(line for line in script.splitlines() if line.startswith("srun "))
        print(f"\n# srun line:\n{srun}")
    else:
        print(f"# --cluster {opts.cluster}: submitit runs the job on this machine; no sbatch script")
    for out, argv in plan.runs:
        print(f"# run folder {out}: hpcgan train {' '.join(argv)}")
    print("# dry run: nothing submitted")


@contextlib.contextmanager
def _child_stderr():
    """Collect what sbatch writes to stderr (submitit lets it through) so a refusal is one line."""
    sys.stderr.flush()
    saved, captured = os.dup(2), []
    with tempfile.TemporaryFile(mode="w+") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            captured.append(capture.read())


def submit(opts: argparse.Namespace, train_argv: list[str]) -> tuple[Plan, list]:
    from hpcgan.launch.job import TrainJob

    if opts.cluster is None:
        opts.cluster = "slurm" if sbatch_reachable() else "local"
    if opts.cluster == "slurm":
        if not shutil.which("sbatch"):
            raise LaunchError("--cluster slurm: sbatch is not on PATH; run on a login node, start the local "
                              "cluster (bash slurm/local/start.sh) or use --cluster local")
    shape = partition_shape(opts.partition) if opts.cluster == "slurm" else None
    if opts.cluster != "slurm" and opts.nodes > 1:
        raise LaunchError(f"--nodes {opts.nodes} needs --cluster slurm; the {opts.cluster} executor runs on this machine")
    plan = plan_runs(opts, train_argv)
    res = resolve_resources(opts, shape)
    if not opts.skip_doctor:
        run_doctor(opts, plan, res)
    folder = plan.runs[0][0].parent if len(plan.runs) > 1 else plan.runs[0][0]
    logs = folder / "submitit" / time.strftime("%Y%m%d-%H%M%S")
    executor = make_executor(opts, logs, res)
    if opts.dry_run:
        print(res.note or f"{res.gpus} GPUs per node")
        dry_run(opts, plan, executor)
        return plan, []
    try:
        with _child_stderr() as stderr:
            if len(plan.runs) > 1:
                with executor.batch():
                    jobs = [executor.submit(TrainJob(), argv) for _, argv in plan.runs]
            else:
                jobs = [executor.submit(TrainJob(), plan.runs[0][1])]
    except Exception as err:  # submitit wraps sbatch's refusal; show its reason in one line
        reason = " ".join(f"{''.join(stderr)} {err}".split())
        match = re.search(r"sbatch: error: (.*?)(?: sbatch: error:|$)", reason)
        shutil.rmtree(logs, ignore_errors=True)
        for empty in (logs.parent, folder):  # leave no trace of a submission that never happened
            with contextlib.suppress(OSError):
                empty.rmdir()
        raise LaunchError(f"SLURM refused the job: {match.group(1) if match else reason[-300:]}") from None
    for (out, _), job in zip(plan.runs, jobs):
        print(f"job {job.job_id} ({opts.cluster}): run folder {out}")
        print(f"  log: {job.paths.stdout}")
    if res.note:
        print(res.note)
    print(f"MLflow experiment '{plan.experiment}'; each run folder records its MLflow run id")
    return plan, jobs


def follow(jobs: list) -> int:
    """Wait for the jobs, echoing rank 0's log as it grows; returns non-zero if any failed."""
    offsets = {job.job_id: 0 for job in jobs}
    failed = 0
    while True:
        for job in jobs:
            log_file = Path(job.paths.stderr)
            if log_file.exists():
                text = log_file.read_text(errors="replace")
                sys.stdout.write(text[offsets[job.job_id]:])
                sys.stdout.flush()
                offsets[job.job_id] = len(text)
        if all(job.done() for job in jobs):
            break
        time.sleep(1.0)
    for job in jobs:
        try:
            print(f"job {job.job_id}: {job.results()[0]}")
        except Exception as err:  # noqa: BLE001 - report every job, then fail
            failed += 1
            print(f"job {job.job_id} failed: {' '.join(str(err).split())[-500:]}", file=sys.stderr)
    return 1 if failed else 0


def print_mlflow_runs(runs: list[Path]) -> None:
    from hpcgan.train.run_folder import RunFolder

    for out in runs:
        info = RunFolder(out).read_tracking()
        if info is not None:
            print(f"MLflow run {info['run_id']} at {info['tracking_uri']} (experiment '{info['experiment']}')")


def main(argv: list[str] | None = None) -> int:
    from hpcgan.data import DataError

    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        split = argv.index("--")
        launch_argv, train_argv = argv[:split], argv[split + 1:]
    else:
        launch_argv, train_argv = argv, []
    opts = build_parser().parse_args(launch_argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not train_argv:
        print("launch/submit.py: error: give the training arguments after --, e.g. -- --data DIR --out RUN",
              file=sys.stderr)
        return 2
    try:
        plan, jobs = submit(opts, train_argv)
    except (LaunchError, ConfigError, DataError) as err:
        print(f"launch/submit.py: error: {err}", file=sys.stderr)
        return 2
    wait = opts.wait if opts.wait is not None else opts.cluster != "slurm"
    if not wait or opts.dry_run:
        return 0
    code = follow(jobs)
    print_mlflow_runs([out for out, _ in plan.runs])
    return code
