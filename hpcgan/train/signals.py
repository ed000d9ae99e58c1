"""Interruption: signal handlers only set a flag; the loop saves at the next step boundary.

Saving inside a handler can deadlock (a collective half-entered, a lock held by the interrupted
frame) or corrupt a file, so the handler does nothing but record which signal arrived.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import torch

from hpcgan.data.reader import PREEMPTION_SIGNALS
from hpcgan.train.state import capture_rng, restore_rng

# "Interrupted, resumable": EX_TEMPFAIL from sysexits.h, distinct from success (0) and crashes (1).
EXIT_INTERRUPTED = 75

RESUMABLE_SIGNALS = PREEMPTION_SIGNALS


class StepAborted(Exception):
    """An interrupt arrived before the step changed any weights; the step has been undone but for the
    data reader, which stays ahead (rewinding DALI or webdataset workers costs seconds): `data` is its
    position at the step's start, the one to save."""

    data: dict[str, Any]


class StepSnapshot:
    """What a step changes before D's update, captured so an aborted step can be undone: the RNG streams,
    module buffers (BatchNorm statistics, spectral-norm vectors), the augmentation state, and the
    reader's position (`data`, saved rather than rewound)."""

    def __init__(self, reader: Any, buffers: list[torch.Tensor], augment: Any) -> None:
        self.data, self.rng = reader.state_dict(), capture_rng()
        self._targets, self._buffers = buffers, [b.clone() for b in buffers]
        self._augment, self._augment_state = augment, augment.state_dict() if augment is not None else None

    def restore(self) -> None:
        restore_rng(self.rng)
        with torch.no_grad():
            torch._foreach_copy_(self._targets, self._buffers)
        if self._augment is not None:
            self._augment.load_state_dict(self._augment_state)


class InterruptFlag:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def worker_lost(self) -> None:
        """A data worker died: stop and be requeued as after a preemption. Recorded as SIGCHLD, the signal
        of a child's death, unless a real signal came first."""
        if self.signum is None:
            self.signum = signal.SIGCHLD

    @property
    def name(self) -> str:
        return "a data worker's death" if self.signum == signal.SIGCHLD else \
            f"signal {signal.Signals(self.signum).name}" if self.signum else "nothing"

    def install(self) -> InterruptFlag:
        for sig in RESUMABLE_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
