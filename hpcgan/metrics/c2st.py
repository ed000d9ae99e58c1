"""Classifier two-sample test (C2ST): can a small CNN tell generated slices from real ones?

Distances in a feature space say how far apart two sets are in that space; a C2ST asks the direct
question. A fixed classifier (the utility test's four-block CNN, `hpcgan.metrics.utility.Classifier`,
two outputs) is trained on real slices against generated ones and scored on real and generated slices
it has not seen. Its held-out balanced accuracy is the number: 0.5 means the classifier cannot tell
the two apart, 1.0 means every slice is recognised. Read it beside its floor, the same test on real
training slices against real held-out ones: a split of a small data set (slabs of one brain) is
itself slightly distinguishable.

Protocol, fixed so values compare across runs: with a separate held-out real set (`heldout`) the
classifier trains on `real` against half of `fake` and is tested on `heldout` against the other half;
without one, `real` and `fake` are each split in two random halves (train / test). Training sides are
cut to equal size. Both sides are rounded to 8-bit levels first, as real slices are stored, so the
classifier cannot win on quantisation alone. Schedule: `ClassifierSettings(steps=C2ST_STEPS)`
(AdamW, warm-up + cosine, 64 slices per step), initialisation and batches seeded by `seed`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from hpcgan.metrics.registry import MetricContext, Result, register
from hpcgan.metrics.utility import ClassifierSettings, as_input, balanced_accuracy, predict, train_classifier

C2ST_STEPS = 200  # 6-10 CPU seconds at 64 px; enough to reach ~1.0 on noisy or blurred slices


@dataclass(frozen=True)
class C2STResult:
    accuracy: float  # balanced held-out accuracy, 0.5 = indistinguishable
    seconds: float
    train_size: int  # slices per side the classifier trained on
    test_size: int  # slices in the test set (both sides)


def quantise(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] slices rounded to the 256 levels real slices are stored with."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def c2st(real_train: torch.Tensor, fake_train: torch.Tensor, real_test: torch.Tensor, fake_test: torch.Tensor, *,
         seed: int = 0, settings: ClassifierSettings = ClassifierSettings(steps=C2ST_STEPS)) -> C2STResult:
    """Train on `real_train` (label 1) vs `fake_train` (label 0), each cut to the smaller side's size,
    and return the balanced accuracy on `real_test` vs `fake_test`."""
    start = time.perf_counter()
    k = min(len(real_train), len(fake_train))
    if k < 2 or not len(real_test) or not len(fake_test):
        raise ValueError(f"c2st needs at least 2 training slices a side and a test slice a side, got "
                         f"{len(real_train)}/{len(fake_train)} to train and {len(real_test)}/{len(fake_test)} to test")
    res = settings.resolution
    train = torch.cat([as_input(quantise(real_train[:k].cpu()), res), as_input(quantise(fake_train[:k].cpu()), res)])
    labels = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)])
    model = train_classifier(train, labels, 2, seed=seed, settings=settings)
    test = torch.cat([quantise(real_test.cpu()), quantise(fake_test.cpu())])
    truth = torch.cat([torch.ones(len(real_test), dtype=torch.long), torch.zeros(len(fake_test), dtype=torch.long)])
    predicted = predict(model, test, res).argmax(dim=1)
    return C2STResult(balanced_accuracy(truth, predicted), time.perf_counter() - start, k, len(test))


def split_halves(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[order[:len(x) // 2]], x[order[len(x) // 2:]]


def two_sample_test(real: torch.Tensor, fake: torch.Tensor, heldout: torch.Tensor | None = None, *,
                    seed: int = 0, settings: ClassifierSettings = ClassifierSettings(steps=C2ST_STEPS)) -> C2STResult:
    """The protocol of the module docstring on one real set, one generated set and an optional held-out set."""
    fake_train, fake_test = split_halves(fake, seed + 1)
    real_train, real_test = (real, heldout) if heldout is not None else split_halves(real, seed)
    return c2st(real_train, fake_train, real_test, fake_test, seed=seed, settings=settings)


@register("c2st")
def _c2st(ctx: MetricContext) -> Result:
    """`c2st`: held-out balanced accuracy; `c2st_seconds`: what the test cost."""
    result = two_sample_test(ctx.real, ctx.fake, ctx.heldout, seed=ctx.seed)
    return {"c2st": result.accuracy, "c2st_seconds": result.seconds}
