"""The GPU checks' one JSON file: the device, and per test its outcome and figures."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any


class Report:
    def __init__(self) -> None:
        self.tests: dict[str, dict[str, Any]] = {}
        self.started = time.time()

    def figures(self, nodeid: str) -> dict[str, Any]:
        return self.tests.setdefault(nodeid, {"outcome": "running"}).setdefault("figures", {})

    def outcome(self, nodeid: str, outcome: str, detail: str = "") -> None:
        entry = self.tests.setdefault(nodeid, {})
        if entry.get("outcome") in (None, "running", "passed"):  # a failed setup or teardown is kept
            entry["outcome"] = outcome
        if detail:
            entry["detail"] = detail

    def write(self, path: str | Path) -> Path:
        """Atomically, so a run killed at its time limit leaves the previous file or a whole new one."""
        import torch

        device = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                  "capability": list(torch.cuda.get_device_capability(0))} if torch.cuda.is_available() else None
        counts: dict[str, int] = {}
        for entry in self.tests.values():
            counts[entry.get("outcome", "unknown")] = counts.get(entry.get("outcome", "unknown"), 0) + 1
        doc = {"host": platform.node(), "torch": torch.__version__, "cuda": torch.version.cuda, "device": device,
               "seconds": round(time.time() - self.started, 1), "counts": counts, "tests": self.tests}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(_finite(doc), indent=1, sort_keys=True))
        os.replace(tmp, path)
        return path


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such figures become strings (and stand out)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
