"""The downstream utility test: its scores on known inputs, its classifier, its arms, and `hpcgan evaluate --utility`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import hpcgan.metrics.utility as U
from hpcgan.cli import main
from hpcgan.data import load_labelled, shards

from data_factories import make_shards
from helpers import make_trainer

FAST = U.ClassifierSettings(steps=60, batch_size=32)


def squares(per_class: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 slices with a bright square at the top, the centre or the bottom (classes 0, 1, 2), jittered
    by a pixel, on faint noise: separable, and unchanged in class by flips and small shifts or rotations."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 40, (3 * per_class, 1, size, size), generator=gen, dtype=torch.uint8)
    labels = torch.arange(3).repeat_interleave(per_class)
    side = size // 4
    for i, c in enumerate(labels.tolist()):
        row = (side // 2, (size - side) // 2, size - side - side // 2)[c] + int(torch.randint(-1, 2, (1,), generator=gen))
        col = (size - side) // 2 + int(torch.randint(-1, 2, (1,), generator=gen))
        images[i, 0, row:row + side, col:col + side] = 230
    return images, labels


def labelled_shards(shard_dir: Path, train_per_class: int, val_per_class: int, size: int = 64) -> Path:
    """A labelled shard folder of `squares` (classes top, centre, bottom) with train and val splits:
    classes a classifier can learn, unlike the random ones of `make_shards`."""
    classes = ["top", "centre", "bottom"]
    shard_dir.mkdir(parents=True)
    records, counts = [], {}
    for seed, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
        images, labels = squares(per_class, seed, size)
        writer = shards.ShardWriter(shard_dir / shards.shard_name(split, 0))
        for i, (image, label) in enumerate(zip(images[:, 0].numpy(), labels.tolist())):
            writer.add(f"{split}{i:06d}", {shards.png_key(size): shards.encode_png(image), "cls": b"%d" % label,
                                           "json": b'{"i": %d}' % i})
        records.append(writer.close() | {"split": split})
        counts[split] = dict.fromkeys(classes, per_class)
    shards.write_manifest(shard_dir, {"format": shards.FORMAT, "sizes": [size], "shards": records, "classes": classes,
                                      "class_counts": counts, "counts": {k: 3 * v for k, v in (
                                          ("train", train_per_class), ("val", val_per_class))}})
    return shard_dir


def test_scores_on_hand_computed_inputs():
    assert U.average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    labels = torch.tensor([0, 0, 1, 1])
    p1 = torch.tensor([0.1, 0.4, 0.35, 0.8])  # of the 4 positive/negative pairs, 3 are ordered right
    assert U.macro_auc(labels, torch.stack([1 - p1, p1], dim=1)) == pytest.approx(0.75)
    assert U.macro_auc(torch.tensor([0, 1]), torch.full((2, 2), 0.5)) == 0.5  # a tie counts half
    # three classes, 2 positives x 4 negatives each: class 0 orders 7 of its 8 pairs right (.5 < .6),
    # class 1 orders 7 and ties one (.3 = .3), class 2 all 8
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    scores = torch.tensor([[.9, .05, .05], [.5, .3, .2], [.6, .3, .1], [.1, .8, .1], [.2, .1, .7], [.1, .2, .7]])
    assert U.macro_auc(labels, scores) == pytest.approx((7 / 8 + 7.5 / 8 + 8 / 8) / 3)
    assert math.isnan(U.macro_auc(torch.zeros(3, dtype=torch.long), torch.rand(3, 2)))  # no negatives anywhere
    truth, predicted = torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([0, 0, 0, 0, 0, 1])
    assert U.accuracy(truth, predicted) == pytest.approx(5 / 6)
    assert U.balanced_accuracy(truth, predicted) == pytest.approx((1 + 0.5) / 2)
    assert U.balanced_accuracy(torch.tensor([2, 2]), torch.tensor([2, 0])) == 0.5  # absent classes do not count
    assert U.spread([0.5, 0.7, 0.9]) == {"mean": pytest.approx(0.7), "std": pytest.approx(0.2), "values": [0.5, 0.7, 0.9]}


def test_inputs_are_downsampled_to_the_classifier_side_only_when_larger():
    big = torch.full((2, 1, 128, 128), 255, dtype=torch.uint8)
    assert U.as_input(big, 64).shape == (2, 1, 64, 64) and torch.allclose(U.as_input(big, 64), torch.ones(1))
    small = torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.equal(U.as_input(small, 64), small)


def test_the_classifier_is_a_function_of_its_seed():
    images, labels = squares(8, seed=0)
    settings = U.ClassifierSettings(steps=5, batch_size=8)
    state = torch.random.get_rng_state()
    first, again, other = (U.train_classifier(images, labels, 3, seed=s, settings=settings, augment=True)
                           for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG stream is untouched
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    assert not torch.equal(first.head.weight, other.head.weight)


def test_arms_on_a_separable_problem_and_the_report_schema():
    train, test, fake = squares(12, seed=0), squares(6, seed=1), squares(24, seed=2)
    needed = U.synthetic_counts(U.class_counts(train[1], 3), 2.0)
    assert needed == [24, 24, 24]
    lines: list[str] = []
    report = U.utility_test(train, test, fake, ("top", "centre", "bottom"), seeds=(0, 1, 2), ratio=2.0,
                            settings=FAST, progress=lines.append)
    assert len(lines) == 3 * len(U.ARMS)
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    assert list(report["arms"]) == list(U.ARMS)
    for arm, by_score in report["arms"].items():
        assert list(by_score) == list(U.SCORES)
        for name, spread in by_score.items():
            assert set(spread) == {"mean", "std", "values"} and len(spread["values"]) == 3
            assert 0 <= spread["mean"] <= 1 and spread["std"] >= 0, (arm, name, spread)
    assert report["arms"]["real"]["accuracy"]["mean"] >= 0.95, report["arms"]["real"]
    assert report["arms"]["real"]["auc"]["mean"] >= 0.98
    assert report["arms"]["synthetic"]["balanced_accuracy"]["mean"] >= 0.9
    assert report["counts"] == {"train": {"top": 12, "centre": 12, "bottom": 12},
                                "test": {"top": 6, "centre": 6, "bottom": 6},
                                "synthetic": {"top": 12, "centre": 12, "bottom": 12},
                                "real+synthetic": {"real": 36, "synthetic": 72}, "pretrain-synthetic": 72}
    assert report["seeds"] == [0, 1, 2] and report["steps"] == 60 and report["synthetic_ratio"] == 2.0
    assert report["classes"] == ["top", "centre", "bottom"] and "AdamW" in report["classifier"]
    generated = report["generated_class_accuracy"]
    assert list(generated) == ["top", "centre", "bottom"] and all(g["mean"] >= 0.9 for g in generated.values())
    assert report["shares"] == [0.25, 0.5, 1.0, 2.0] and report["best_use"] == U.best_use(report["arms"])


def test_best_use_names_the_arm_that_beat_the_control_or_says_none_did():
    def arms(**accuracy):
        return {arm: {"accuracy": {"mean": value, "std": 0.01}} for arm, value in accuracy.items()}

    helped = U.best_use(arms(**{"real": 0.8, "synthetic": 0.99, "real+augment": 0.9, "real+synthetic": 0.85,
                                "pretrain-synthetic": 0.93}))
    assert helped.startswith("The synthetic slices helped most as pretrain-synthetic") and "+0.030" in helped
    none = U.best_use(arms(**{"real+augment": 0.9, "real+synthetic": 0.85, "real+augment+synthetic x1": 0.88}))
    assert none.startswith("No way of using the synthetic slices beat real+augment") and "real+augment+synthetic x1" in none


def test_fine_tuning_starts_from_the_pretrained_weights():
    train = squares(8, seed=0)
    pretrained = U.train_classifier(*train, 3, seed=0, settings=FAST)
    frozen = U.ClassifierSettings(steps=1, batch_size=8, lr=1e-12, weight_decay=0.0)
    tuned = U.train_classifier(*train, 3, seed=5, settings=frozen, start=pretrained)
    fresh = U.train_classifier(*train, 3, seed=5, settings=frozen)
    assert torch.allclose(tuned.head.weight, pretrained.head.weight)
    assert not torch.allclose(fresh.head.weight, pretrained.head.weight)


def test_slices_of_the_wrong_class_are_caught():
    train, test, (images, labels) = squares(12, seed=0), squares(6, seed=1), squares(24, seed=2)
    report = U.utility_test(train, test, (images, (labels + 1) % 3), ("top", "centre", "bottom"), seeds=(0,),
                            settings=FAST)
    assert all(g["mean"] <= 0.1 for g in report["generated_class_accuracy"].values())
    assert report["arms"]["synthetic"]["accuracy"]["mean"] <= 0.1
    assert report["arms"]["real"]["accuracy"]["mean"] >= 0.95


def test_too_few_synthetic_slices_are_refused():
    train, fake = squares(4, seed=0), squares(2, seed=1)
    with pytest.raises(ValueError, match="class 0: 4 synthetic slices wanted, 2 given"):
        U.utility_test(train, train, fake, ("a", "b", "c"), settings=FAST)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    return labelled_shards(tmp_path_factory.mktemp("utility") / "shards", train_per_class=8, val_per_class=4)


def test_labelled_shards_read_back(labelled):
    images, labels, classes = load_labelled(labelled, "val", 64)
    assert images.shape == (12, 1, 64, 64) and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert classes == ("top", "centre", "bottom")


def test_a_conditional_run_gets_its_utility_report(labelled, tmp_path, capsys):
    out = tmp_path / "run"
    trainer = make_trainer(labelled, out, "model.conditional=true", "train.steps=2", "metrics.every=0",
                           "track.enabled=true", f"track.uri=sqlite:///{tmp_path / 'db'}", "track.experiment=utility")
    assert trainer.fit() == 0
    code = main(["evaluate", "--utility", "--run", str(out), "--data", str(labelled), "--steps", "8",
                 "--synthetic-ratio", "0.5"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    report = json.loads((out / "utility.json").read_text())
    assert list(report["arms"]) == ["real", "synthetic", "real+synthetic", "real+augment",
                                    "real+augment+synthetic x0.25", "real+augment+synthetic x0.5",
                                    "real+augment+synthetic x1", "real+augment+synthetic x2", "pretrain-synthetic"]
    assert all(set(s) == {"accuracy", "balanced_accuracy", "auc"} for s in report["arms"].values())
    assert report["step"] == 2 and report["seeds"] == [0, 1, 2] and report["steps"] == 8
    assert report["counts"]["real+synthetic"] == {"real": 24, "synthetic": 12}
    assert report["counts"]["synthetic"] == {"top": 8, "centre": 8, "bottom": 8}
    assert report["counts"]["pretrain-synthetic"] == 48 and report["best_use"] in printed.out
    assert list(report["generated_class_accuracy"]) == ["top", "centre", "bottom"]
    assert (out / "utility.png").read_bytes().startswith(b"\x89PNG")
    assert "real+augment" in printed.out and "real classifier on generated slices" in printed.out
    run = MlflowClient(f"sqlite:///{tmp_path / 'db'}").get_run(trainer.state.mlflow_run_id)
    assert run.data.metrics["utility/real_synthetic/accuracy"] == pytest.approx(
        report["arms"]["real+synthetic"]["accuracy"]["mean"])
    assert "utility/generated/top" in run.data.metrics
    artifacts = MlflowClient(f"sqlite:///{tmp_path / 'db'}").list_artifacts(trainer.state.mlflow_run_id, "utility")
    assert sorted(a.path for a in artifacts) == ["utility/utility.json", "utility/utility.png"]


def test_utility_of_the_slices_that_sample_would_export(labelled, tmp_path, capsys):
    """The selection flags of `hpcgan sample` choose the synthetic slices, and the report says how."""
    out = tmp_path / "run"
    assert make_trainer(labelled, out, "model.conditional=true", "train.steps=2", "metrics.every=0").fit() == 0
    code = main(["evaluate", "--utility", "--run", str(out), "--data", str(labelled), "--steps", "8",
                 "--filter-d-quantile", "0.5", "--class-check", "0.01"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    report = json.loads((out / "utility.json").read_text())
    d, check = report["selection"]["discriminator"], report["selection"]["class_check"]
    assert d["acceptance_rate"] == 0.5 and d["candidates"] >= 96  # 16 per class wanted, 32 drawn per class
    assert check["threshold"] == 0.01 and 0 <= check["heldout_accuracy"] <= 1
    assert report["counts"]["synthetic"] == {"top": 8, "centre": 8, "bottom": 8}
    assert "synthetic slices: the discriminator's lowest-scored 50% dropped" in printed.out
    assert main(["evaluate", "--utility", "--run", str(out), "--data", str(labelled), "--truncation-z", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--truncation-z -1.0" in err


@pytest.fixture(scope="module")
def unconditional_run(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("utility") / "plain"
    assert make_trainer(image_folder, out, "train.steps=1", "metrics.every=0").fit() == 0
    return out


def test_an_unconditional_run_or_unlabelled_data_is_a_one_line_error(unconditional_run, labelled, tmp_path, capsys):
    assert main(["evaluate", "--utility", "--run", str(unconditional_run), "--data", str(labelled)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{unconditional_run}: the run is not conditional" in err
    assert "model.conditional=true" in err
    make_shards(tmp_path / "plain", n_train=6, n_val=3, sizes=(64,))
    assert main(["evaluate", "--utility", "--run", str(unconditional_run), "--data", str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'plain'}: the shards carry no class labels" in err
    assert "--labels" in err
