"""Interruption: signal handlers only set a flag; the loop saves at the next step boundary.

Saving inside a handler can deadlock (a collective half-entered, a lock held by the interrupted
frame) or corrupt a file, so the handler does nothing but record which signal arrived.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

# "Interrupted, resumable": EX_TEMPFAIL from sysexits.h, distinct from success (0) and crashes (1).
EXIT_INTERRUPTED = 75

RESUMABLE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class StepAborted(Exception):
    """An interrupt arrived before the step changed any weights; the step has been undone but for the
    data reader, which stays ahead (rewinding DALI or webdataset workers costs seconds): `data` is its
    position at the step's start, the one to save."""

    data: dict[str, Any]


class InterruptFlag:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def install(self) -> InterruptFlag:
        for sig in RESUMABLE_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
