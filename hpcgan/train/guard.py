"""The divergence guard: steps with a non-finite loss or gradient are skipped on the device, and a run that
keeps failing, or diverges, is told to roll back.

Before each optimizer step `check` looks at the loss and every gradient in one fused kernel (the one the
fp16 loss scaler uses) and hands the verdict to the fused Adam kernel as its `found_inf`: a bad step then
leaves weights, moments and step count as they were, and nothing waits for the device. Bad steps are
counted on the device as well; `read` takes the counts where the loop syncs anyway (every
`train.log_every` steps), so the guard adds no host sync. A healthy step runs the same arithmetic as with
the guard off, bit for bit.

Rolling back (the loop's part) happens after `train.max_bad_steps` bad steps in a row, or when D is
saturated (mean sigmoid of D on reals > 0.99 and on fakes < 0.01) while `metrics.best` stays worse than
its best by `train.divergence_margin` (relative) for `train.divergence_patience` evaluations in a row.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from hpcgan.config import Config

log = logging.getLogger(__name__)

EXIT_DIVERGED = 1
SATURATED_REAL, SATURATED_FAKE = 0.99, 0.01


class Guard:
    """One per trainer; every rank takes the same decisions, since gradients are all-reduced before the
    check and the loop agrees on the rest."""

    def __init__(self, cfg: Config, device: torch.device, scaled: bool) -> None:
        self.tcfg, self.best_key = cfg.train, cfg.metrics.best
        self.enabled = cfg.train.guard
        self._scaled = scaled  # an fp16 loss scaler skips overflowing steps itself: only the loss is checked
        self._one = torch.ones((), device=device)
        self._step_bad = torch.zeros((), device=device)
        self._counts = torch.zeros(3, device=device)  # bad steps since the last read, streak, longest streak
        self._saturated = False
        self._worse = 0  # evaluations in a row with D saturated and the metric worse than its best by the margin
        self.good_step = 0  # the last step whose evaluation was not part of such a streak

    def inject(self, step: int, rollbacks: int) -> bool:
        """The test hook `train.inject_nan_step`: whether step `step` gets NaN losses (not after a rollback)."""
        return self.tcfg.inject_nan_step == step and rollbacks == 0

    def check(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        """Just before `optimizer.step()`, on the plain torch optimizer: mark the step bad when the loss or a
        gradient is non-finite, so the step leaves everything as it was."""
        found = (~torch.isfinite(loss.detach().float())).float().reshape(())
        if not self._scaled:
            grads: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        grads.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
            for same in grads.values():  # sets `found` on any inf/NaN; the 1.0 scale leaves gradients exact
                torch._amp_foreach_non_finite_check_and_unscale_(same, found, self._one)
            if optimizer.defaults.get("fused"):
                optimizer.found_inf = found  # the fused kernel skips the update on the device
            else:  # no such kernel: the step runs on zero gradients (Adam's momentum still moves the weights)
                skip = found.bool()
                for same in grads.values():
                    for g in same:
                        g.masked_fill_(skip, 0.0)
        self._step_bad = torch.maximum(self._step_bad, found)

    def end_step(self, stats: torch.Tensor) -> torch.Tensor:
        """Count the step; a bad step's statistics are zeroed so one NaN does not spoil a log interval."""
        bad, c = self._step_bad, self._counts
        streak = (c[1] + 1.0) * bad
        self._counts = torch.stack([c[0] + bad, streak, torch.maximum(c[2], streak)])
        self._step_bad = torch.zeros_like(bad)
        return torch.where(bad.bool(), torch.zeros_like(stats), stats)

    def observed(self, logits: torch.Tensor) -> torch.Tensor:
        """D's logits as the augmentation may tally them: a NaN counts as neither sign."""
        return logits.nan_to_num(nan=0.0)

    def read(self, record: dict[str, float], step: int) -> tuple[int, str | None]:
        """At a log boundary (the device is synced): the bad steps since the last read, and why to roll back
        (None: no reason). Adds `bad_steps` to the record and notes whether D is saturated."""
        bad, streak, longest = (int(v) for v in self._counts.tolist())
        self._counts = torch.tensor([0.0, streak, streak], device=self._counts.device)
        record["bad_steps"] = bad
        self._saturated = record["d_real"] > SATURATED_REAL and record["d_fake"] < SATURATED_FAKE
        if bad:
            log.warning("skipped %d step(s) with a non-finite loss or gradient up to step %d", bad, step)
        if longest >= self.tcfg.max_bad_steps:
            return bad, (f"{longest} steps in a row had a non-finite loss or gradient "
                         f"(train.max_bad_steps={self.tcfg.max_bad_steps})")
        return bad, None

    def evaluated(self, step: int, value: float, best: float | None) -> str | None:
        """After an in-loop evaluation (`best`: the best value before it): why to roll back, or None."""
        worse = best is not None and value > best * (1 + self.tcfg.divergence_margin)
        if worse and self._saturated:
            self._worse += 1
        else:
            self._worse, self.good_step = 0, step
        if self._worse < self.tcfg.divergence_patience:
            return None
        return (f"D saturated (D(x) > {SATURATED_REAL}, D(G(z)) < {SATURATED_FAKE}) and {self.best_key} "
                f"{value:.4g} worse than its best {best:.4g} by more than train.divergence_margin="
                f"{self.tcfg.divergence_margin:g} for {self._worse} evaluations")

    def reset(self, step: int) -> None:
        """After a rollback to `step`: streaks start afresh."""
        self._counts.zero_()
        self._step_bad.zero_()
        self._saturated, self._worse, self.good_step = False, 0, step


def all_finite(modules: Iterable[torch.nn.Module]) -> torch.Tensor:
    """Whether every floating-point weight and buffer of `modules` is finite (a device-side bool)."""
    flags = [torch.isfinite(t).all() for m in modules for t in m.state_dict().values() if t.is_floating_point()]
    return torch.stack(flags).all()
