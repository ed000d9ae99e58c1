"""What one `hpcgan bench` invocation measures: the stages, the two modes and the resolved plan."""

from __future__ import annotations

from dataclasses import dataclass

STAGES = ("readers", "checkpoint", "interrupt", "scaling")
MODES = {  # quick: CI on 2 CPU cores in a few minutes; full: the documented run (hours on 2 CPU cores)
    "quick": {"resolutions": [64], "batches": [128], "warmup": 1, "steps": 2, "repeats": 3, "reader_batches": 10,
              "interrupt_phases": [0.0, 0.7]},
    "full": {"resolutions": [64, 128], "batches": [128, 512], "warmup": 1, "steps": 3, "repeats": 3,
             "reader_batches": 40, "interrupt_phases": [0.0, 0.25, 0.5, 0.75]},
}


@dataclass(frozen=True)
class Plan:
    mode: str  # quick | full
    data: str | None
    resolutions: list[int]
    batches: list[int]
    warmup: int
    steps: int
    repeats: int
    reader_batches: int
    interrupt_phases: list[float]  # when in a step the interrupt arrives, as fractions of the step
    skip: frozenset[str]
    compile: bool
    peaks: dict[str, float]
    overrides: list[str]

    @property
    def headline(self) -> tuple[int, int]:
        """The configuration the contract's single figures and the CPU targets refer to."""
        return (64 if 64 in self.resolutions else self.resolutions[0],
                128 if 128 in self.batches else self.batches[0])


QUALITY_BUDGET_S = {"quick": 60.0, "cpu": 600.0, "cuda": 120.0}  # training seconds per side


@dataclass(frozen=True)
class QualityPlan:
    """`hpcgan bench --quality`: every loop for the same training seconds, then every snapshot scored."""

    mode: str  # quick | full
    data: str | None
    presets: tuple[str, ...]  # hpcgan's configs raced against the reference: preset names or YAML files
    budget_s: float | None  # None: QUALITY_BUDGET_S by mode, then by device
    every_s: float | None  # None: a tenth of the budget
    samples: int  # fixed latents per snapshot, the same for both loops
    overrides: list[str]  # on top of the preset; model.* keys also size the reference
    seed: int = 0

    def budget(self, device: str) -> float:
        if self.budget_s is not None:
            return self.budget_s
        return QUALITY_BUDGET_S["quick" if self.mode == "quick" else "cuda" if device == "cuda" else "cpu"]

    def every(self, device: str) -> float:
        return self.every_s if self.every_s is not None else self.budget(device) / 10
