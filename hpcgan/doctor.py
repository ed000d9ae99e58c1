"""`hpcgan doctor`: a preflight of a machine or a job, one line per check with a verdict and a fix.

Run it on a login node (what a submission can know: partition, time limit, disk, run folder, MLflow) and
inside a job with the job's own srun/torchrun layout (what only the job sees: devices, precision, the
collective across ranks, a run folder every node sees, DALI). The exit code is non-zero when any check
fails. `launch/submit.py` runs the quick checks (those that need no GPU and no peers) before submitting.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcgan.config import Config, ConfigError, resolve_tracking_uri
from hpcgan.launch.slurm_info import gres_gpus
from hpcgan.train.deadline import format_duration, job_end_time, parse_time_left

# File systems that SQLite's locking cannot trust across hosts.
NETWORK_FS = {"nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "beegfs", "fuse.sshfs", "ceph", "fuse.glusterfs",
              "panfs", "wekafs", "9p"}
MIN_TIME_LIMIT_S = 300  # less than this and startup plus one checkpoint may not fit


@dataclass
class Check:
    name: str
    verdict: str  # ok | warn | fail
    detail: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.verdict:<4} {self.name}: {self.detail}" + (f" -> {self.fix}" if self.fix and
                                                                  self.verdict != "ok" else "")


# ---------------------------------------------------------------- devices
def gpus_requested(env: dict[str, str]) -> int | None:
    """GPUs SLURM gave this node's tasks (SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, SLURM_JOB_GPUS), or
    those CUDA_VISIBLE_DEVICES lists; None when nothing says."""
    for var in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        count = gpus_in(env.get(var, ""))
        if count is not None:
            return count
    for var in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES"):
        if env.get(var, "").strip() not in ("", "NoDevFiles"):
            return len([d for d in env[var].split(",") if d.strip()])
    return None


def nvidia_smi_gpus() -> int | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(line.startswith("GPU ") for line in proc.stdout.splitlines()) if proc.returncode == 0 else 0


def check_devices(env: dict[str, str]) -> Check:
    """The torch build (CUDA, ROCm, CPU) against the GPUs this job or machine has."""
    import torch

    build = (f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {torch.version.hip}"
             if getattr(torch.version, "hip", None) else "CPU")
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    expected = gpus_requested(env)
    smi = nvidia_smi_gpus()
    have = f"torch {torch.__version__} ({build} build) sees {seen} GPU(s)"
    hardware = max(expected or 0, smi or 0)
    if hardware and build == "CPU":
        return Check("devices", "fail", f"{have}, but this node has {hardware}",
                     "install a CUDA (or ROCm) build of torch: pip install torch --index-url "
                     "https://download.pytorch.org/whl/cu124 (match the cluster's driver)")
    if hardware and seen == 0:
        return Check("devices", "fail", f"{have}, but {hardware} are allocated/installed",
                     "torch cannot reach the driver: check `nvidia-smi`, the CUDA module and CUDA_VISIBLE_DEVICES")
    from hpcgan.train.devices import choose_cuda_device

    choice = choose_cuda_device(env, seen)
    if choice.shared:
        return Check("devices", "warn", f"{have}; {choice.why}",
                     "request one GPU per task (--gpus-per-node equal to the tasks per node)")
    if expected is not None and seen != expected:
        return Check("devices", "warn", f"{have}; the job was given {expected}",
                     f"request --gpus-per-node to match tasks (this process trains on {choice.why})")
    if seen:
        names = sorted({torch.cuda.get_device_name(i) for i in range(seen)})
        return Check("devices", "ok", f"{have}: {', '.join(names)}")
    if env.get("SLURM_JOB_ID") and env.get("SLURM_JOB_PARTITION") and build != "CPU" and \
            (partition_gpus(env["SLURM_JOB_PARTITION"]) or 0) > 0:
        return Check("devices", "fail", f"{have}: this job on GPU partition {env['SLURM_JOB_PARTITION']} has none",
                     "request them: --gpus-per-node G (sbatch/srun and launch/submit.py)")
    return Check("devices", "ok", f"{have}; training runs on CPU here")


def check_cpus(env: dict[str, str]) -> Check | None:
    """The cores this task may use against --cpus-per-task: srun (SLURM >= 22.05) does not inherit the
    job's --cpus-per-task, and a task pinned to one core starves its data workers."""
    wanted = int(env.get("SLURM_CPUS_PER_TASK", "0") or 0)
    if not wanted or not hasattr(os, "sched_getaffinity"):
        return None
    have = len(os.sched_getaffinity(0))
    text = f"{have} core(s) usable, --cpus-per-task={wanted}, OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}"
    if have < wanted:
        return Check("cpus", "warn", text, "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK before srun "
                     "(launch/submit.py's jobs get it from submitit)")
    return Check("cpus", "ok", text)


def check_precision() -> Check:
    """bf16 and fp16 on each visible device; `train.mixed_precision=auto` picks bf16 where it exists."""
    import torch

    if not torch.cuda.is_available():
        return Check("precision", "ok", "no GPU: fp32, or bf16 autocast on CPU")
    lacking = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        if (major, minor) < (8, 0):
            lacking.append(f"cuda:{i} (sm_{major}{minor})")
    if lacking:
        return Check("precision", "warn", f"no bf16 on {', '.join(lacking)}: fp16 with a loss scaler",
                     "keep train.mixed_precision=auto (fp16 there) or set fp16 explicitly")
    return Check("precision", "ok", f"bf16 and fp16 on all {torch.cuda.device_count()} GPU(s)")


def check_dali(cfg: Config) -> Check:
    """DALI importable, and one PNG decoded where training would decode it (GPU "mixed" or CPU)."""
    try:
        import numpy as np
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        verdict = "fail" if cfg.data.reader == "dali" else "ok"
        return Check("dali", verdict, "not installed (data.reader=auto uses webdataset)",
                     "pip install 'hpcgan[dali]', or set data.reader=webdataset")
    import io

    import torch
    from PIL import Image

    gpu = torch.cuda.is_available()
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buffer, format="PNG")
    png = np.frombuffer(buffer.getvalue(), dtype=np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=0 if gpu else None)
    def pipeline() -> Any:
        data = fn.external_source(source=lambda: [png], batch=True, dtype=types.UINT8)
        return fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=types.GRAY)

    where = "GPU (mixed)" if gpu else "CPU"
    try:
        pipe = pipeline()
        pipe.build()
        (out,) = pipe.run()
        shape = tuple(out.as_cpu().at(0).shape) if gpu else tuple(out.at(0).shape)
        assert shape == (8, 8, 1), shape
    except Exception as err:  # noqa: BLE001 - any failure is the answer
        return Check("dali", "fail", f"DALI cannot decode a PNG on the {where} here ({type(err).__name__}: "
                     f"{str(err).strip().splitlines()[0][:160] if str(err).strip() else ''})",
                     "install the nvidia-dali build for this CUDA version, or set data.reader=webdataset")
    import nvidia.dali

    return Check("dali", "ok", f"DALI {nvidia.dali.__version__} decodes on the {where}")


# ---------------------------------------------------------------- ranks
def launched_world(env: dict[str, str]) -> int:
    """Processes started together with this one: torchrun's WORLD_SIZE, or the tasks of this srun step
    (not the job's: a batch script is one process even when the job has several tasks)."""
    if env.get("WORLD_SIZE"):
        return int(env["WORLD_SIZE"])
    return int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) if env.get("SLURM_STEP_ID") not in (None, "batch") else 1


def slurm_rendezvous(env: dict[str, str]) -> dict[str, str]:
    """torch.distributed's env:// variables from an srun step: the step's first node is the master; the
    port is derived from the job and step ids, the same on every rank."""
    nodes = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_STEP_NODELIST"]], capture_output=True,
                           text=True, timeout=30).stdout.split()
    port = 30000 + (int(env["SLURM_JOB_ID"]) * 16 + int(env.get("SLURM_STEP_ID", "0"))) % 20000
    return {"MASTER_ADDR": nodes[0] if nodes else "127.0.0.1", "MASTER_PORT": str(port),
            "RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}


def join_ranks(timeout_s: float) -> Check:
    """One tiny all-reduce across the job's ranks (NCCL with GPUs, else gloo); the group stays up for the
    shared run folder check. torchrun's environment is used as is; under srun it is derived from SLURM's."""
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ:
        os.environ.update(slurm_rendezvous(dict(os.environ)))
    world = int(os.environ["WORLD_SIZE"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        from hpcgan.train.devices import choose_cuda_device

        device = torch.device("cuda", choose_cuda_device(os.environ, torch.cuda.device_count()).index)
        torch.cuda.set_device(device)
    where = f"{backend} across {world} ranks (MASTER_ADDR {os.environ.get('MASTER_ADDR')}:" \
            f"{os.environ.get('MASTER_PORT')})"
    start = time.perf_counter()
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": device} if backend == "nccl" else {}))
        total = torch.ones(1, device=device)
        dist.all_reduce(total)
        if int(total.item()) != world:
            raise RuntimeError(f"all-reduce of ones gave {total.item():.0f}")
    except Exception as err:  # noqa: BLE001 - a failed rendezvous is the answer
        return Check("ranks", "fail", f"{where}: {type(err).__name__}: "
                     f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}",
                     "every node must reach MASTER_ADDR:MASTER_PORT (firewall, NCCL_SOCKET_IFNAME/"
                     "GLOO_SOCKET_IFNAME naming the fabric interface)")
    return Check("ranks", "ok", f"{where}: all-reduce in {time.perf_counter() - start:.2f} s")


def check_shared_folder(out: Path) -> Check:
    """A file written by rank 0 into the run folder is read by every rank: one folder every node sees."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    probe = out / f".doctor-{os.environ.get('SLURM_JOB_ID') or os.environ.get('MASTER_PORT', 'probe')}"
    token = [f"{socket.gethostname()}:{os.getpid()}:{time.time()}" if rank == 0 else None]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text(token[0])
    dist.broadcast_object_list(token, src=0)
    try:
        seen = probe.read_text() == token[0]
    except OSError:
        seen = False
    views: list[Any] = [None] * world
    dist.all_gather_object(views, (socket.gethostname(), seen))
    dist.barrier()
    if rank == 0:
        probe.unlink(missing_ok=True)
    blind = sorted({host for host, ok in views if not ok})
    if blind:
        return Check("shared run folder", "fail", f"{out}: a file rank 0 wrote there is not visible on "
                     f"{', '.join(blind)}", "put --out on a file system every node mounts (not /tmp or "
                     "node-local scratch)")
    return Check("shared run folder", "ok", f"{out}: seen by all {world} ranks on "
                 f"{len({host for host, _ in views})} node(s)")


# ---------------------------------------------------------------- run folder, disk, tracking
def existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_run_folder(out: Path, tidy: bool = False) -> Check:
    """The run folder can be created and written here; with `tidy`, folders created only to find out are
    removed (a submission that is refused leaves nothing behind)."""
    created = [p for p in (out.absolute(), *out.absolute().parents) if not p.exists()] if tidy else []
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".doctor-write-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
        for folder in created:
            folder.rmdir()
    except OSError as err:
        return Check("run folder", "fail", f"{out} is not writable ({err.strerror or err})",
                     "choose an --out under a folder you can write (project or scratch space)")
    return Check("run folder", "ok", f"{out} writable")


def checkpoint_bytes(cfg: Config) -> int:
    """One checkpoint: G, D and the EMA copy of G in fp32, plus Adam's two moments of G and D."""
    import torch

    from hpcgan.models import build_models

    with torch.device("meta"):
        generator, discriminator = build_models(cfg.model)
    g = sum(p.numel() for p in generator.parameters())
    d = sum(p.numel() for p in discriminator.parameters())
    ema = g if cfg.train.ema else 0
    return 4 * (3 * g + 3 * d + ema)


def check_disk(out: Path, cfg: Config) -> Check:
    """Free space for the checkpoints kept (keep + the one being written + milestones + best)."""
    one = checkpoint_bytes(cfg)
    count = cfg.checkpoint.keep + 1 + len(cfg.checkpoint.milestones) + (1 if cfg.metrics.every > 0 else 0)
    need = one * count
    where = existing_parent(out)
    free = shutil.disk_usage(where).free
    text = (f"{_size(free)} free at {where}; checkpoints need {_size(need)} ({count} x {_size(one)})")
    if free < need:
        return Check("disk", "fail", text, "free space, lower checkpoint.keep, or put --out on a larger file system")
    if free < 2 * need:
        return Check("disk", "warn", text, "less than twice what checkpoints need: samples and logs need room too")
    return Check("disk", "ok", text)


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def fs_type(path: Path) -> str:
    """The file system type of the mount holding `path`, from /proc/mounts ('' where unknown)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    target, best = str(existing_parent(path).resolve()), ("", "")
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
            best = (point, fields[2])
    return best[1]


def check_mlflow(cfg: Config, several_jobs: bool) -> Check:
    """The tracking server answers; a SQLite store is not on a network file system when several jobs or
    nodes write to it (its locks do not hold there: "database is locked", or a rank hung to the limit)."""
    if not cfg.track.enabled:
        return Check("mlflow", "ok", "tracking disabled (track.enabled=false)")
    uri = resolve_tracking_uri(cfg.track.uri)
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as reply:
                reply.read()
        except (OSError, urllib.error.URLError) as err:
            reason = getattr(err, "reason", err)
            return Check("mlflow", "fail", f"{uri} unreachable ({reason})",
                         "start the server (mlflow server --host 0.0.0.0 ...) or fix track.uri / MLFLOW_TRACKING_URI")
        return Check("mlflow", "ok", f"{uri} answers")
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        kind = fs_type(db)
        if not os.access(existing_parent(db), os.W_OK):
            return Check("mlflow", "fail", f"SQLite store {db}: folder not writable",
                         "set track.uri to a writable sqlite:/// path or a tracking server")
        if kind in NETWORK_FS and several_jobs:
            return Check("mlflow", "warn", f"SQLite store {db} is on {kind}, written by several jobs/nodes",
                         "run one `mlflow server` (its own SQLite on local disk) and set track.uri=http://HOST:PORT")
        return Check("mlflow", "ok", f"SQLite store {db} ({kind or 'unknown fs'})")
    return Check("mlflow", "ok", f"{uri}")


# ---------------------------------------------------------------- scheduler
def gpus_in(value: str) -> int | None:
    """GPUs in a SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE value ('4', 'a100:2', 'a100:2,v100:1') or a GRES
    string ('gpu:a100:4(S:0-1)'); None when empty or unreadable."""
    value = value.strip()
    if not value:
        return None
    if value.startswith("gpu") or value == "(null)":
        return gres_gpus(value)
    counts = [item.split("(")[0].rsplit(":", 1)[-1].strip() for item in value.split(",")]
    return sum(int(c) for c in counts) if all(c.isdigit() for c in counts) else None


def partition_gpus(partition: str) -> int | None:
    """Most GPUs on one node of `partition` (sinfo GRES); None when sinfo cannot say."""
    try:
        proc = subprocess.run(["sinfo", "-h", "-p", partition, "-o", "%G"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return max(gres_gpus(line) for line in proc.stdout.split())


def default_partition() -> str | None:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((p.rstrip("*") for p in out.split() if p.endswith("*")), None)


def check_partition(partition: str | None, gpus_per_node: int) -> Check | None:
    """The partition's GPUs per node against the request."""
    if not shutil.which("sinfo"):
        return None
    partition = partition or default_partition()
    if partition is None:
        return None
    have = partition_gpus(partition)
    if not gpus_per_node:
        if have:
            return Check("partition", "warn", f"{partition} has {have} GPU(s) per node, none requested: the job "
                         "would train on CPU", f"add --gpus-per-node {have}")
        return None
    if have is None:
        return Check("partition", "warn", f"{partition}: sinfo does not list it",
                     "check --partition against `sinfo -s`")
    if have < gpus_per_node:
        return Check("partition", "fail", f"{partition} has {have} GPU(s) per node, {gpus_per_node} requested",
                     f"lower --gpus-per-node to {have} or pick a GPU partition (sinfo -o '%P %G')" if have else
                     "pick a GPU partition (sinfo -o '%P %G')")
    return Check("partition", "ok", f"{partition} has {have} GPU(s) per node, {gpus_per_node} requested")


def check_time_limit(limit_s: float | None, cfg: Config, step_s: float | None) -> Check | None:
    """The job's time limit against one checkpoint interval (checkpoint.every steps of `step_s`)."""
    if limit_s is None:
        return None
    every = cfg.checkpoint.every
    text = f"time limit {format_duration(limit_s)}"
    if step_s:
        interval = every * step_s
        text += f", checkpoint every {every} steps x {step_s:g} s = {format_duration(interval)}"
        if interval >= limit_s:
            return Check("time limit", "fail", text + ": the job ends before its first checkpoint",
                         f"set checkpoint.every={max(int(limit_s / 2 / step_s), 1)} or raise --time")
    elif limit_s < MIN_TIME_LIMIT_S:
        return Check("time limit", "warn", text + f"; step time unknown (checkpoint every {every} steps)",
                     "give the job more than a few minutes, and pass --step-time S to check the interval")
    if limit_s < MIN_TIME_LIMIT_S:
        return Check("time limit", "warn", text + ": startup alone may take a minute",
                     "give the job more than a few minutes")
    return Check("time limit", "ok", text)


# ---------------------------------------------------------------- putting it together
def quick_checks(cfg: Config, out: Path, *, partition: str | None = None, gpus_per_node: int = 0,
                 limit_s: float | None = None, step_s: float | None = None, several_jobs: bool = False,
                 tidy: bool = False) -> list[Check]:
    """What can be known before submitting: no GPU, no peers needed."""
    checks = [check_run_folder(out, tidy)]
    if checks[0].verdict == "ok":
        checks.append(check_disk(out, cfg))
    checks += [check_mlflow(cfg, several_jobs), check_partition(partition, gpus_per_node),
               check_time_limit(limit_s, cfg, step_s)]
    return [c for c in checks if c is not None]


def preflight(runs: list[list[str]], *, slurm: bool, partition: str | None, gpus_per_node: int | None,
              nodes: int, tasks: int, time_limit: str | None) -> list[Check]:
    """The quick checks of each run's `hpcgan train` arguments, as a submission would run them."""
    from hpcgan.cli import build_parser, resolve_train_config

    checks: list[Check] = []
    for argv in runs:
        args = build_parser().parse_args(["train", *argv])
        checks += quick_checks(resolve_train_config(args), Path(args.out), partition=partition if slurm else None,
                               gpus_per_node=(gpus_per_node or 0) if slurm else 0,
                               limit_s=parse_time_left(time_limit) if slurm and time_limit else None,
                               several_jobs=len(runs) > 1 or nodes > 1 or tasks > 1, tidy=True)
    return checks


def all_checks(cfg: Config, out: Path, opts: argparse.Namespace) -> list[Check]:
    """Everything: the quick checks plus devices, precision, DALI and, across the job's ranks, the
    collective and the shared run folder."""
    env = dict(os.environ)
    world = launched_world(env)
    limit = parse_time_left(opts.time) if opts.time else None
    if opts.time and limit is None and opts.time.strip().upper() != "UNLIMITED":
        raise ConfigError(f"--time {opts.time!r}: use minutes, MM:SS, HH:MM:SS or D-HH:MM:SS")
    if limit is None and not opts.time:
        end = job_end_time(env)
        limit = None if end is None else end - time.time()
    several = world > 1 or int(env.get("SLURM_JOB_NUM_NODES", "1") or 1) > 1 or opts.nodes > 1
    gpus = opts.gpus_per_node if opts.gpus_per_node is not None else (gpus_requested(env) or 0) \
        if env.get("SLURM_JOB_ID") else 0
    checks = [c for c in (check_devices(env), check_cpus(env), check_precision(), check_dali(cfg)) if c is not None]
    checks += quick_checks(cfg, out, partition=opts.partition, gpus_per_node=gpus, limit_s=limit,
                           step_s=opts.step_time, several_jobs=several)
    if world > 1:
        ranks = join_ranks(opts.timeout)
        checks.append(ranks)
        if ranks.verdict == "ok" and all(c.verdict == "ok" for c in checks if c.name == "run folder"):
            checks.append(check_shared_folder(out))
    return checks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="run folder to check (written to and read back); default: the working folder")
    parser.add_argument("--config", action="append", default=[], help="YAML config file (repeatable)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (repeatable)")
    parser.add_argument("--partition", help="partition to check GPUs of (default: the job's, else the default one)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node the submission requests")
    parser.add_argument("--nodes", type=int, default=1, help="nodes the submission requests")
    parser.add_argument("--time", help="time limit to check (SLURM format); default: this job's time left")
    parser.add_argument("--step-time", type=float, help="seconds per training step (from a bench or a run's log)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for the other ranks")
    parser.add_argument("--json", help="also write the verdicts to this JSON file (rank 0)")


def run(args: argparse.Namespace) -> int:
    from hpcgan.config import build_config
    from hpcgan.train.run_folder import RunFolder

    out = Path(args.out or ".").absolute()
    base = RunFolder(out).saved_config() if args.out else None  # a run folder's own config, as train resumes it
    cfg = build_config(base=base, files=args.config, overrides=args.overrides)
    if args.partition is None:
        args.partition = os.environ.get("SLURM_JOB_PARTITION")
    checks = all_checks(cfg, out, args)
    rank = int(os.environ.get("RANK", "0"))
    failed = [c for c in checks if c.verdict == "fail"]
    for check in checks:  # a shared folder's verdict is the same on every rank: rank 0 says it
        if rank == 0 or (check.verdict != "ok" and check.name != "shared run folder"):
            print(f"[{socket.gethostname()} rank {rank}] {check.line()}" if launched_world(dict(os.environ)) > 1
                  else check.line(), flush=True)
    if rank == 0:
        print(f"doctor: {len(failed)} failed, {sum(c.verdict == 'warn' for c in checks)} warning(s), "
              f"{sum(c.verdict == 'ok' for c in checks)} ok", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps([c.__dict__ for c in checks], indent=1))
    _leave()
    return 1 if failed else 0


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
