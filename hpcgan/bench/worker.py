"""One training loop in its own process, driven by the benchmark over a pipe.

Why a process per loop: the reference's DataLoader forks its workers from the process that runs it, at
every epoch. Forked from a process that also held hpcgan's trainers, every page those trainers write
afterwards would be copied (copy-on-write) while the workers live: a cost the reference would impose on
hpcgan that neither pays in real use. In its own process each loop pays only for itself.

Protocol: JSON lines. The parent sends the spec, then commands; the child answers each with one line:
    {"kind": "hpcgan", "config": {...}, "run_dir": DIR} | {"kind": "reference", "config": {...}, "root": DIR}
    -> {"ready": true}
    {"op": "steps", "n": N}  -> {"images": I, "seconds": S}
    {"op": "checkpoint"}     -> checkpointing.save_and_restore of the trained hpcgan loop
    {"op": "quit"}           -> {}
A failure answers {"error": "..."}; the traceback goes to the child's log file.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch

from hpcgan.bench.flops import sync
from hpcgan.bench.reference import ReferenceDCGAN
from hpcgan.bench.throughput import reference_for
from hpcgan.config import Config, build_config
from hpcgan.train import Trainer


class LoopProcess:
    """The parent's handle on one loop process."""

    def __init__(self, spec: dict[str, Any], log: Path) -> None:
        self.log = log
        self._log_file = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "hpcgan.bench.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log_file, text=True, bufsize=1)
        self._send(spec)

    def _send(self, message: dict[str, Any]) -> None:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark loop process exited with {self.proc.wait()}; see {self.log}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"benchmark loop failed: {reply['error']} (see {self.log})")
        return reply

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        self._send({"op": op, **args})
        return self.receive()

    def warmup(self, steps: int) -> float | None:
        """Seconds the warm-up took (torch.compile's compilation included), None for no warm-up."""
        return self.call("steps", n=steps)["seconds"] if steps else None

    def images_per_s(self, steps: int) -> float:
        reply = self.call("steps", n=steps)
        return reply["images"] / reply["seconds"]

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self._send({"op": "quit"})
                self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            self._log_file.close()


class _TrainerSteps:
    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.trainer = Trainer(cfg, run_dir)

    def steps(self, n: int) -> int:
        stats = None
        for _ in range(n):
            stats = self.trainer.step()
        if stats is not None and not all(math.isfinite(v) for v in stats.tolist()):  # .tolist() syncs
            raise FloatingPointError(f"hpcgan training diverged at step {self.trainer.state.step}")
        return n * self.trainer.cfg.train.batch_size

    def close(self) -> None:
        pass


class _ReferenceSteps:
    def __init__(self, reference: ReferenceDCGAN) -> None:
        self.device = reference.device
        self._iterations = reference.iterations()

    def steps(self, n: int) -> int:
        images = 0
        for _ in range(n):
            stats = next(self._iterations)  # its .item() calls sync every iteration
            if not stats.finite():
                raise FloatingPointError(f"reference training diverged: {stats}")
            images += stats.batch_size
        sync(self.device)
        return images

    def close(self) -> None:
        self._iterations.close()  # ends the epoch's DataLoader workers


def _serve(spec: dict[str, Any], reply: Callable[[dict[str, Any]], None]) -> None:
    cfg = build_config(base=spec["config"])
    if spec["kind"] == "hpcgan":
        loop: _TrainerSteps | _ReferenceSteps = _TrainerSteps(cfg, Path(spec["run_dir"]))
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        loop = _ReferenceSteps(reference_for(cfg, Path(spec["root"]), device))
    reply({"ready": True})
    try:
        for line in sys.stdin:
            command = json.loads(line)
            if command["op"] == "steps":
                start = time.perf_counter()
                images = loop.steps(command["n"])
                reply({"images": images, "seconds": time.perf_counter() - start})
            elif command["op"] == "checkpoint" and isinstance(loop, _TrainerSteps):
                from hpcgan.bench.checkpointing import save_and_restore

                reply(save_and_restore(loop.trainer))
            elif command["op"] == "quit":
                return
            else:
                reply({"error": f"unknown command {command}"})
    finally:
        loop.close()


def main() -> None:
    protocol: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever else writes to stdout lands in the log, not in the protocol

    def reply(message: dict[str, Any]) -> None:
        protocol.write(json.dumps(message) + "\n")

    try:
        _serve(json.loads(sys.stdin.readline()), reply)
    except Exception as err:  # noqa: BLE001 - reported to the parent in one line, traceback in the log
        traceback.print_exc()
        reply({"error": f"{type(err).__name__}: {err}"})
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
