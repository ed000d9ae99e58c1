"""What a SLURM partition's nodes offer, from `sinfo`: GPUs (GRES) and CPUs per node.

The parsing is separate from the query so that GRES strings of clusters this machine is not part of can be
tested, and so that `hpcgan doctor` can report the same numbers the launcher uses for its defaults.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass


class SinfoError(RuntimeError):
    """sinfo did not answer, or does not know the partition; the message says which."""


@dataclass(frozen=True)
class NodeShape:
    partition: str
    gpus: int  # GPUs per node (the smallest node of the partition)
    cpus: int  # CPUs per node (the smallest node of the partition)


def gres_gpus(gres: str) -> int:
    """GPUs per node in a GRES string as `sinfo -o %G` prints it: 'gpu:a100:4(S:0-1)' -> 4,
    'gpu:2,shard:8' -> 2, 'gpu:a100:2,gpu:v100:2' -> 4, 'gpu' -> 1, '(null)' -> 0."""
    total = 0
    for item in re.split(r",(?![^(]*\))", gres.strip()):
        fields = re.sub(r"\(.*?\)", "", item).split(":")
        if fields[0] != "gpu":
            continue
        count = fields[-1] if len(fields) > 1 else "1"
        total += int(count) if count.isdigit() else 1  # 'gpu:a100' (a type, no count) is one
    return total


def cpu_count(text: str) -> int:
    """`sinfo -o %c` ('64', '32+' when nodes differ) -> the smallest count."""
    match = re.match(r"\d+", text.strip())
    return int(match.group()) if match else 1


def parse_sinfo(text: str, partition: str | None) -> NodeShape:
    """Lines of `sinfo -h -o '%P|%G|%c'` -> the shape of `partition`'s nodes (None: the default partition,
    marked '*'); nodes that differ give the smallest, which a job fits wherever it lands."""
    rows = [line.split("|") for line in text.splitlines() if line.count("|") == 2]
    if partition is None:
        partition = next((p.rstrip("*") for p, _, _ in rows if p.endswith("*")), rows[0][0] if rows else "")
    mine = [(g, c) for p, g, c in rows if p.rstrip("*") == partition]
    if not mine:
        known = sorted({p.rstrip("*") for p, _, _ in rows})
        raise SinfoError(f"no such partition {partition!r} (this cluster has: {', '.join(known) or 'none'})")
    return NodeShape(partition, min(gres_gpus(g) for g, _ in mine), min(cpu_count(c) for _, c in mine))


def node_shape(partition: str | None = None) -> NodeShape:
    """The shape of `partition`'s nodes (None: the default partition), asked of sinfo."""
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P|%G|%c"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        raise SinfoError(f"sinfo failed ({err})") from None
    if proc.returncode != 0:
        raise SinfoError(f"sinfo failed: {' '.join(proc.stderr.split())}")
    return parse_sinfo(proc.stdout, partition)
