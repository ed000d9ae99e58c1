"""Downstream utility: do synthetic slices help a classifier that is tested on real ones?

A pretty sample grid is not what users want from synthetic MRI; they want a diagnostic model that gets
better. This test trains one small, fixed classifier per arm and seed, with the same step budget for
every arm, and tests it on held-out real slices:

* `real`            the real training slices;
* `synthetic`       generated slices only, as many per class as the real training split has;
* `real+synthetic`  the real slices plus `ratio` times as many generated ones (per class);
* `real+augment`    the real slices with classic augmentation (pose and intensity), the control that
                    synthetic data must beat to be worth generating;
* `real+augment+synthetic xS`  what a researcher would do: the real slices plus S times as many
                    generated ones (per class), all augmented, for each share S in `SHARES`;
* `pretrain-synthetic`  pretrained on every generated slice, then fine-tuned on the real ones (both
                    phases augmented, `steps` steps each, the fine-tuning from the pretrained weights).

`best_use` names, in one sentence, the way of using the synthetic slices that helped most, measured
against `real+augment`.

Classifier: four blocks of (3x3 conv stride 2, BatchNorm, ReLU) with 16-32-64-128 channels, global
average pool, linear layer. Inputs are single-channel slices in [-1, 1] at 64 px (larger slices are
downsampled, bilinear with antialiasing; smaller ones are used as they are). Schedule: AdamW (lr 2e-3,
weight decay 0.05), 5 % linear warm-up then cosine decay, 64 slices per step drawn uniformly from the
arm's training set, `steps` steps. The seed fixes the initialisation (inside a forked global RNG, so the
caller's stream is untouched), the batch draws and the augmentation draws; every arm runs the same seeds,
so the arms of one seed start from the same weights and differ only in their data.

Metrics on the test set: accuracy, balanced accuracy (mean recall over the classes present) and macro
one-vs-rest ROC AUC (rank formula, ties averaged), each as mean, sample std and per-seed values.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpcgan.data.pixels import to_unit
from hpcgan.metrics.encoder import EncoderSettings, augment as pose_augment

SHARES = (0.25, 0.5, 1.0, 2.0)  # synthetic slices per real one in the real+augment+synthetic arms
ARMS = ("real", "synthetic", "real+synthetic", "real+augment", *(f"real+augment+synthetic x{s:g}" for s in SHARES),
        "pretrain-synthetic")
CONTROL = "real+augment"  # what synthetic data must beat
SCORES = ("accuracy", "balanced_accuracy", "auc")
# Classic augmentation of the control arm: the offline encoder's pose draws (rotation +-8 deg, zoom +-8 %,
# translation +-5 % of the side, left-right flip), then a contrast gain and a gamma, which keep black black.
POSE = EncoderSettings()
GAIN, GAMMA = 0.1, 1.25  # gain in 1 +- GAIN, gamma log-uniform in [1 / GAMMA, GAMMA]

Labelled = tuple[torch.Tensor, torch.Tensor]  # images (N, 1, H, W), uint8 or float in [-1, 1]; int64 labels (N,)


@dataclass(frozen=True)
class ClassifierSettings:
    """The fixed classifier and its budget; identical for every arm."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    width: int = 16  # channels of the first block, doubled per block
    resolution: int = 64  # larger slices are downsampled to this side

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2 or self.width < 1 or self.resolution < 16:
            raise ValueError(f"classifier settings need steps >= 1, batch_size >= 2, width >= 1 and resolution "
                             f">= 16, got {self}")

    def describe(self) -> str:
        w = self.width
        return (f"4 x (conv3x3 stride 2, BatchNorm, ReLU) {w}-{2 * w}-{4 * w}-{8 * w}, global average pool, linear; "
                f"AdamW lr {self.lr:g} weight decay {self.weight_decay:g}, 5% warm-up + cosine, "
                f"{self.steps} steps of {self.batch_size}, at most {self.resolution} px")


class Classifier(nn.Module):
    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        chans = [1, width, 2 * width, 4 * width, 8 * width]
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False),
                                                    nn.BatchNorm2d(b), nn.ReLU(inplace=True))
                                      for a, b in zip(chans, chans[1:])))
        self.head = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(dim=(2, 3)))


def as_input(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 or [-1, 1] float slices as float32 in [-1, 1], downsampled to `resolution` when larger."""
    x = to_unit(images) if images.dtype == torch.uint8 else images.float()
    if x.shape[-1] > resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return x


def classic_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Pose (rotation, zoom, shift, flip) and intensity (gain, gamma) jitter of [-1, 1] slices."""
    u = ((pose_augment(x, POSE, gen) + 1) / 2).clamp(0, 1)
    n = len(x)
    gain = 1 + (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1) * GAIN
    gamma = GAMMA ** (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
    return (u.pow(gamma) * gain).clamp(0, 1) * 2 - 1


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, seed: int,
                     settings: ClassifierSettings = ClassifierSettings(), augment: bool = False,
                     start: Classifier | None = None) -> Classifier:
    """The classifier trained on `images` (see the module docstring), in eval mode; from a copy of
    `start`'s weights (fine-tuning) instead of the seed's initialisation when given."""
    x, y = as_input(images, settings.resolution), labels.long()
    if len(x) < 2:
        raise ValueError(f"a classifier needs at least 2 training slices, got {len(x)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier(settings.width, num_classes).to(memory_format=torch.channels_last)
    if start is not None:
        model.load_state_dict(start.state_dict())
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = max(1, settings.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * i / settings.steps)))
    batch = min(settings.batch_size, len(x))
    model.train()
    for _ in range(settings.steps):
        pick = torch.randperm(len(x), generator=gen)[:batch]
        xb = classic_augment(x[pick], gen) if augment else x[pick]
        loss = F.cross_entropy(model(xb.contiguous(memory_format=torch.channels_last)), y[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, resolution: int = 64, batch: int = 512) -> torch.Tensor:
    """Class probabilities (N, K) of slices, in eval mode."""
    x = as_input(images, resolution).contiguous(memory_format=torch.channels_last)
    return torch.cat([model(x[i:i + batch]).softmax(dim=1) for i in range(0, len(x), batch)])


def accuracy(labels: torch.Tensor, predicted: torch.Tensor) -> float:
    return float((labels == predicted).double().mean()) if len(labels) else math.nan


def balanced_accuracy(labels: torch.Tensor, predicted: torch.Tensor) -> float:
    """Mean recall over the classes present in `labels` (chance is 1/K whatever the class balance)."""
    recalls = [float((predicted[labels == c] == c).double().mean()) for c in labels.unique().tolist()]
    return sum(recalls) / len(recalls) if recalls else math.nan


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of `values`, tied values sharing the mean of their ranks."""
    order = values.argsort(stable=True)
    sorted_values = values[order]
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2  # of each run of equal values
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[order] = mean_rank[inverse]
    return ranks


def macro_auc(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """Mean one-vs-rest ROC AUC over the classes that have positives and negatives in `labels`.

    Per class, AUC = (rank sum of the positives - P (P + 1) / 2) / (P N) with ranks of that class's
    score: the probability that a random positive scores above a random negative, ties counting half.
    """
    aucs = []
    for c in range(scores.shape[1]):
        positive = labels == c
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if n_pos and n_neg:
            rank_sum = float(average_ranks(scores[:, c].double())[positive].sum())
            aucs.append((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return sum(aucs) / len(aucs) if aucs else math.nan


def scores(labels: torch.Tensor, probabilities: torch.Tensor) -> dict[str, float]:
    predicted = probabilities.argmax(dim=1)
    return {"accuracy": accuracy(labels, predicted), "balanced_accuracy": balanced_accuracy(labels, predicted),
            "auc": macro_auc(labels, probabilities)}


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value) and the values themselves."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels.long(), minlength=num_classes).tolist()


def take_per_class(labels: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Indices of the first `counts[c]` slices of each class c."""
    picks = []
    for c, wanted in enumerate(counts):
        have = (labels == c).nonzero()[:, 0]
        if len(have) < wanted:
            raise ValueError(f"class {c}: {wanted} synthetic slices wanted, {len(have)} given")
        picks.append(have[:wanted])
    return torch.cat(picks)


def synthetic_counts(train_counts: Sequence[int], ratio: float) -> list[int]:
    """Generated slices per class that `utility_test` needs: enough for the `synthetic` arm (as many as
    the real training split), for `real+synthetic` (`ratio` times as many) and for the largest share."""
    return [max(n, round(max(ratio, *SHARES) * n)) for n in train_counts]


def best_use(arms: dict[str, dict[str, Any]]) -> str:
    """One sentence: which arm that uses synthetic slices reached the highest held-out accuracy, against
    the `real+augment` control (means over the seeds, with their std)."""
    def text(arm: str) -> str:
        spread = arms[arm]["accuracy"]
        return f"{spread['mean']:.3f} ± {spread['std']:.3f}"

    users = [arm for arm in arms if "synthetic" in arm and arm != "synthetic"]
    best = max(users, key=lambda arm: arms[arm]["accuracy"]["mean"])
    gain = arms[best]["accuracy"]["mean"] - arms[CONTROL]["accuracy"]["mean"]
    if gain > 0:
        return (f"The synthetic slices helped most as {best}: held-out accuracy {text(best)} against {text(CONTROL)} "
                f"for {CONTROL} alone ({gain:+.3f}).")
    return (f"No way of using the synthetic slices beat {CONTROL} ({text(CONTROL)}); the best was {best} "
            f"({text(best)}, {gain:+.3f}).")


def utility_test(train: Labelled, test: Labelled, synthetic: Labelled, classes: Sequence[str], *,
                 seeds: Sequence[int] = (0, 1, 2), ratio: float = 1.0,
                 settings: ClassifierSettings = ClassifierSettings(),
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every arm for every seed, scored on `test`; a JSON-ready dict.

    `synthetic` must hold at least `synthetic_counts(train counts, ratio)` slices per class, labelled
    with the class each was generated for. Besides the arms, `generated_class_accuracy` is the share of
    the `synthetic` arm's slices of each class that the `real` classifier assigns to that class: whether
    a conditional generator makes the class it is asked for (classes without training slices are left out).
    """
    if ratio < 0:
        raise ValueError(f"the synthetic ratio must be >= 0, got {ratio}")
    k = len(classes)
    train_counts = class_counts(train[1], k)
    fake_only = take_per_class(synthetic[1], train_counts)
    fake_extra = take_per_class(synthetic[1], [round(ratio * n) for n in train_counts])
    pretrain = take_per_class(synthetic[1], synthetic_counts(train_counts, ratio))

    def with_real(picks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([as_input(train[0], settings.resolution), as_input(synthetic[0][picks], settings.resolution)]),
                torch.cat([train[1], synthetic[1][picks]]))

    sets = {
        "real": (train[0], train[1], False),
        "synthetic": (synthetic[0][fake_only], synthetic[1][fake_only], False),
        "real+synthetic": (*with_real(fake_extra), False),
        "real+augment": (train[0], train[1], True),
        **{f"real+augment+synthetic x{share:g}":
           (*with_real(take_per_class(synthetic[1], [round(share * n) for n in train_counts])), True)
           for share in SHARES},
        "pretrain-synthetic": (train[0], train[1], True),
    }
    test_x = as_input(test[0], settings.resolution)
    values: dict[str, dict[str, list[float]]] = {arm: {s: [] for s in SCORES} for arm in ARMS}
    fake_x, fake_y = sets["synthetic"][:2]
    generated: dict[int, list[float]] = {c: [] for c in range(k) if train_counts[c]}
    for seed in seeds:
        for arm, (images, labels, augment) in sets.items():
            start = train_classifier(synthetic[0][pretrain], synthetic[1][pretrain], k, seed=seed, settings=settings,
                                     augment=True) if arm == "pretrain-synthetic" else None
            model = train_classifier(images, labels, k, seed=seed, settings=settings, augment=augment, start=start)
            result = scores(test[1], predict(model, test_x, settings.resolution))
            for name, value in result.items():
                values[arm][name].append(value)
            if arm == "real":
                hits = predict(model, fake_x, settings.resolution).argmax(dim=1) == fake_y
                for c, found in generated.items():
                    found.append(float(hits[fake_y == c].double().mean()))
            if progress is not None:
                progress(f"seed {seed}  {arm:<15} " + "  ".join(f"{n} {v:.3f}" for n, v in result.items()))
    arms = {arm: {name: spread(v) for name, v in by_score.items()} for arm, by_score in values.items()}
    return {
        "classes": list(classes), "seeds": list(seeds), "steps": settings.steps, "synthetic_ratio": ratio,
        "shares": list(SHARES),
        "classifier": settings.describe(), "settings": asdict(settings),
        "counts": {"train": dict(zip(classes, train_counts)), "test": dict(zip(classes, class_counts(test[1], k))),
                   "synthetic": dict(zip(classes, class_counts(fake_y, k))),
                   "real+synthetic": {"real": len(train[1]), "synthetic": len(fake_extra)},
                   "pretrain-synthetic": len(pretrain)},
        "arms": arms,
        "best_use": best_use(arms),
        "generated_class_accuracy": {classes[c]: spread(v) for c, v in generated.items()},
    }
