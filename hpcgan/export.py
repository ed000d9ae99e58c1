"""`hpcgan sample`: a synthetic data set from a trained run, marked synthetic, with its data card.

Slices come from the run's EMA generator (or the raw one). Before anything is written, every slice is
audited against the run's training slices (nearest neighbour by RMS distance and SSIM, thresholds
calibrated on held-out real slices): a slice that looks copied is left out, counted, and replaced by a
fresh draw, so a synthetic set never ships a near-duplicate of a patient slice. Every file is marked
synthetic where its format allows (PNG text chunk, NIfTI description, shard manifest), and the folder
carries `datacard.json` (machine-readable provenance) beside `DATACARD.md` (for people). Shards are in
the format `hpcgan train --data` reads, so synthetic and real shards train alike.

Before the audit, slices can be chosen for quality (all off by default, all recorded in the data card):
`--filter-d-quantile q` draws n / (1 - q) candidates (per class) and keeps the n that the run's
discriminator scores highest (its logit), so the q share it finds least real is dropped; `--truncation
psi` pulls StyleGAN2's styles toward their average w, and `--truncation-z t` redraws every latent
component with |z| > t (any arch): both trade diversity for typical slices. `--class-check p` (a
conditional run on labelled shards) trains the utility test's fixed classifier on the run's real
training slices and drops, and redraws, every slice whose own class it gives a probability below p.

A conditional run exports the classes asked for with `--class` (default: all of them), in the
proportions of its `train.class_balance`: the training data's, or equal. Each slice keeps its class:
a `cls` member and the manifest's `classes` in shards, one folder per class for PNGs (the ImageFolder
layout `hpcgan train` reads as labels), one NIfTI stack per class; the data card counts them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcgan.config import Config, ConfigError
from hpcgan.data import load_labelled, load_real, shards
from hpcgan.data.pixels import to_unit, to_uint8
from hpcgan.train.checkpoint import CheckpointManager, resolve_checkpoint
from hpcgan.train.conditioning import allocate
from hpcgan.train.evaluation import dataset_key
from hpcgan.train.generator import load_discriminator, load_generator
from hpcgan.train.run_folder import CONFIG_FILE, config_of
from hpcgan.train.samples import generate

log = logging.getLogger(__name__)

FORMATS = ("png", "shards", "nifti")
DATACARD, DATACARD_MD = "datacard.json", "DATACARD.md"
# Draws to replace slices the audit or the class check left out: a class the generator draws right a
# quarter of the time is still short by 0.02 % of its slices after 30.
MAX_ROUNDS = 30
CLASS_CHECK_STEPS = 300  # the utility classifier's default budget: ~90 % accuracy on the quickstart axes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder (latest checkpoint) or checkpoint folder")
    parser.add_argument("--n", type=int, default=64, help="synthetic slices to export")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--format", choices=FORMATS, default="png",
                        help="png files, WebDataset shards that hpcgan train reads, or one NIfTI stack")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--no-ema", action="store_true", help="use the raw generator instead of the EMA copy")
    parser.add_argument("--no-audit", action="store_true",
                        help="skip the memorization audit against the training slices (recorded in the data card)")
    parser.add_argument("--class", dest="classes", action="append", default=[], metavar="C",
                        help="conditional run: export class C only (name or index; repeatable); default every "
                             "class, in the proportions of the run's train.class_balance")
    parser.add_argument("--filter-d-quantile", type=float, default=0.0, metavar="Q",
                        help="draw n/(1-Q) candidates and drop the Q share the run's discriminator scores lowest")
    parser.add_argument("--truncation", type=float, default=1.0, metavar="PSI",
                        help="stylegan2: pull styles toward the average w (PSI in (0, 1]; 1 = off)")
    parser.add_argument("--truncation-z", type=float, default=0.0, metavar="T",
                        help="redraw latent components with |z| > T (any arch; 0 = off)")
    parser.add_argument("--class-check", type=float, default=0.0, metavar="P",
                        help="conditional run: drop and redraw slices whose class a classifier trained on the run's "
                             "real training slices gives a probability below P (0 = off)")


def run(args: argparse.Namespace) -> int:
    selection = Selection(d_quantile=args.filter_d_quantile, truncation=args.truncation,
                          truncation_z=args.truncation_z, class_check=args.class_check)
    card = export(Path(args.run), Path(args.out), n=args.n, fmt=args.format, seed=args.seed, ema=not args.no_ema,
                  batch=args.batch, audit=not args.no_audit, classes=args.classes, selection=selection)
    left_out = card["memorization"].get("left_out", 0)
    dropped = (card["selection"].get("class_check") or {}).get("dropped", 0)
    print(f"wrote {card['count']} synthetic slices ({args.format}) to {args.out}"
          + (f"; {left_out} left out by the memorization audit" if left_out else "")
          + (f"; {dropped} dropped by the class check" if dropped else "")
          + f"; data card {Path(args.out) / DATACARD}")
    return 0


@dataclass(frozen=True)
class Selection:
    """How candidate slices are drawn and chosen before the memorization audit (see the module docstring)."""

    d_quantile: float = 0.0
    truncation: float = 1.0
    truncation_z: float = 0.0
    class_check: float = 0.0

    def validate(self, arch: str, conditional: bool) -> None:
        if not 0 <= self.d_quantile < 1:
            raise ConfigError(f"--filter-d-quantile {self.d_quantile}: must be in [0, 1)")
        if not 0 < self.truncation <= 1:
            raise ConfigError(f"--truncation {self.truncation}: must be in (0, 1] (1 = off)")
        if self.truncation != 1 and arch != "stylegan2":
            raise ConfigError(f"--truncation: a {arch} generator has no style space to truncate; use --truncation-z T")
        if self.truncation_z < 0 or not 0 <= self.class_check <= 1:
            raise ConfigError(f"--truncation-z {self.truncation_z} --class-check {self.class_check}: need T >= 0 "
                              "and P in [0, 1]")
        if self.class_check and not conditional:
            raise ConfigError("--class-check: the run is unconditional, so its slices have no class to check")

    def judges(self, folder: Path, cfg: Config, seed: int) -> tuple[torch.nn.Module | None, torch.nn.Module | None,
                                                                    dict[str, Any]]:
        """After validating against the run: the discriminator and the class-check classifier this selection
        needs (None where it needs none), and the classifier's record for the data card."""
        self.validate(cfg.model.arch, bool(cfg.model.num_classes))
        discriminator = load_discriminator(folder) if self.d_quantile > 0 else None
        classifier, check = class_classifier(cfg.data.path, cfg.model.resolution, seed) if self.class_check \
            else (None, {})
        return discriminator, classifier, check


def truncated_normal(n: int, nz: int, threshold: float, gen: torch.Generator) -> torch.Tensor:
    """(n, nz) standard normal latents, every component with |z| > `threshold` redrawn until none is
    (BigGAN's truncation trick); `threshold` 0 leaves them untruncated."""
    z = torch.randn(n, nz, generator=gen)
    while threshold > 0 and (out := z.abs() > threshold).any():
        z[out] = torch.randn(int(out.sum()), generator=gen)
    return z


def _draw(generator: torch.nn.Module, n: int, seed: int, batch: int, labels: torch.Tensor | None,
          selection: Selection = Selection()) -> torch.Tensor:
    z = truncated_normal(n, generator.nz, selection.truncation_z, torch.Generator().manual_seed(seed))
    return generate(generator, z, labels, batch=batch, seed=seed, truncation_psi=selection.truncation)


@torch.no_grad()
def d_scores(discriminator: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None,
             batch: int = 256) -> torch.Tensor:
    """(N,) discriminator logits, in eval mode and fixed batches (StyleGAN2's D looks at batch statistics)."""
    parts = [(images[i:i + batch], None if labels is None else labels[i:i + batch]) for i in range(0, len(images), batch)]
    return torch.cat([(discriminator(x) if y is None else discriminator(x, y)).float().flatten() for x, y in parts])


def top_per_class(scores: torch.Tensor, labels: torch.Tensor | None, wanted: torch.Tensor | None,
                  n: int) -> torch.Tensor:
    """Indices of the highest `scores`: `n` in all, or per class as many as `wanted` holds of it."""
    if labels is None:
        return scores.argsort(descending=True)[:n]
    picks = []
    for c, count in zip(*wanted.unique(return_counts=True)):
        members = (labels == c).nonzero()[:, 0]
        picks.append(members[scores[members].argsort(descending=True)[:int(count)]])
    return torch.cat(picks)


def _candidates(generator: torch.nn.Module, discriminator: torch.nn.Module | None, wanted: torch.Tensor | None,
                n: int, seed: int, batch: int, selection: Selection, stats: dict[str, Any]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`n` slices (of the classes `wanted` asks for): the best-scored of n / (1 - q) per class with a
    discriminator filter, else plain draws; counts go into `stats`."""
    if discriminator is None:
        return _draw(generator, n, seed, batch, wanted, selection), wanted
    keep = 1 - selection.d_quantile
    if wanted is None:
        labels = None
        m = math.ceil(n / keep)
    else:
        classes, counts = wanted.unique(return_counts=True)
        labels = torch.repeat_interleave(classes, torch.tensor([math.ceil(int(c) / keep) for c in counts]))
        m = len(labels)
    images = _draw(generator, m, seed, batch, labels, selection)
    scores = d_scores(discriminator, images, labels, batch)
    chosen = top_per_class(scores, labels, wanted, n)
    stats["candidates"] += m
    stats["kept"] += len(chosen)
    stats["lowest_kept_logit"] = min(stats.get("lowest_kept_logit", math.inf), float(scores[chosen].min()))
    if m > len(chosen):
        dropped = scores[~torch.isin(torch.arange(m), chosen)]
        stats["highest_dropped_logit"] = max(stats.get("highest_dropped_logit", -math.inf), float(dropped.max()))
    return images[chosen], labels[chosen] if labels is not None else None


def class_classifier(data: str, size: int, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The utility test's fixed classifier trained on the run's real training slices, and its accuracy on
    the held-out ones (how far its verdict can be trusted)."""
    import hpcgan.metrics.utility as U

    how = "hpcgan prepare SRC --out SHARDS --labels folder|axis|contrast|TABLE.csv"
    if not shards.is_shard_dir(Path(data)):
        raise ConfigError(f"{data}: not a shard folder; --class-check trains a classifier on labelled shards ({how})")
    x, y, classes = load_labelled(data, "train", size)
    if not classes:
        raise ConfigError(f"{data}: the shards carry no class labels; --class-check needs labelled shards ({how})")
    settings = U.ClassifierSettings(steps=CLASS_CHECK_STEPS)
    model = U.train_classifier(x, y, len(classes), seed=seed, settings=settings)
    test_x, test_y, _ = load_labelled(data, "val", size)
    accuracy = U.accuracy(test_y, U.predict(model, test_x, settings.resolution).argmax(1)) if len(test_y) else None
    return model, {"classifier": settings.describe(), "trained_on": "the run's real training slices",
                   "heldout_accuracy": accuracy}


def recognised(classifier: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, threshold: float) -> torch.Tensor:
    """(N,) bool: the classifier gives each slice's own class a probability of at least `threshold`."""
    from hpcgan.metrics.utility import predict

    return predict(classifier, images).gather(1, labels.long()[:, None])[:, 0] >= threshold


def _class_index(name: str, classes: list[str], run: Path) -> int:
    """A `--class` value: a class name, else an index."""
    if name in classes:
        return classes.index(name)
    if name.isdigit() and int(name) < len(classes):
        return int(name)
    raise ConfigError(f"--class {name}: {run} has no such class (its classes: "
                      f"{', '.join(f'{i} {c}' for i, c in enumerate(classes))})")


def _export_labels(run: Path, model_classes: int, counts: dict[str, int], balance: str, chosen: Sequence[str],
                  n: int) -> torch.Tensor | None:
    """The class of each slice to export (None for an unconditional run): the `chosen` classes (default
    all), `n` in all, split as in the training data (`balance` "data") or equally ("balanced")."""
    if not model_classes:
        if chosen:
            raise ConfigError(f"--class: {run} trained an unconditional model (model.conditional=false), which "
                              "cannot generate a class; export without --class")
        return None
    names = list(counts)
    picked = {_class_index(c, names, run) for c in chosen} or set(range(len(names)))
    weights = [(counts[c] if balance == "data" else 1) if i in picked else 0 for i, c in enumerate(names)]
    if not sum(weights):
        raise ConfigError(f"--class {' '.join(chosen)}: no training slices of these classes, so the run "
                          "(train.class_balance=data) never generated them")
    return allocate(n, weights)


def select(generator: torch.nn.Module, labels: torch.Tensor | None, n: int, seed: int, batch: int,
           train: torch.Tensor | None, heldout: torch.Tensor | None, selection: Selection = Selection(),
           discriminator: torch.nn.Module | None = None, classifier: torch.nn.Module | None = None
           ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any], dict[str, Any]]:
    """`n` slices, of the classes `labels` asks for, chosen by `selection`, none of which the class check
    or the audit drops (fewer only if MAX_ROUNDS draws cannot supply them): a dropped slice is replaced
    by a fresh one of its class. Returns the slices, their classes, the audit's and the selection's record."""
    from hpcgan.metrics.memorization import memorization_audit

    d_stats: dict[str, Any] = {"quantile": selection.d_quantile, "candidates": 0, "kept": 0}
    dropped = 0
    kept, kept_labels, wanted, left_out, summary = [], [], labels, 0, {}
    for round_ in range(MAX_ROUNDS):
        missing = n - sum(len(k) for k in kept)
        if missing <= 0:
            break
        fake, fake_labels = _candidates(generator, discriminator, wanted, missing, seed + 7919 * round_, batch,
                                        selection, d_stats)
        keep = torch.ones(len(fake), dtype=torch.bool)
        if classifier is not None:
            keep = recognised(classifier, fake, fake_labels, selection.class_check)
            dropped += int((~keep).sum())
        if train is not None:
            result = memorization_audit(train, fake, heldout=heldout)
            flagged = result.flagged.cpu() & keep
            left_out += int(flagged.sum())
            keep &= ~flagged
            summary = {k: v for k, v in result.summary().items() if not k.endswith("_png")}
        kept.append(fake[keep])
        if wanted is not None:
            kept_labels.append(fake_labels[keep])
            wanted = fake_labels[~keep]
    audit = {"audited": True, "left_out": left_out, "rounds": round_ + 1, **summary} if train is not None \
        else {"audited": False}
    record: dict[str, Any] = {"truncation_psi": selection.truncation, "truncation_z": selection.truncation_z}
    if discriminator is not None:
        record["discriminator"] = {**d_stats, "acceptance_rate": d_stats["kept"] / d_stats["candidates"]}
    if classifier is not None:
        record["class_check"] = {"threshold": selection.class_check, "dropped": dropped}
    return (torch.cat(kept)[:n], torch.cat(kept_labels) if labels is not None else None, audit, record)


def export(run: Path, out: Path, *, n: int, fmt: str, seed: int = 0, ema: bool = True, batch: int = 256,
           audit: bool = True, classes: Sequence[str] = (), selection: Selection = Selection()) -> dict[str, Any]:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: choose from {', '.join(FORMATS)}")
    if n < 1:
        raise ConfigError(f"--n {n}: must be at least 1")
    check_out_folder(out)
    folder = resolve_checkpoint(run)
    cfg = config_of(folder)
    state = CheckpointManager.read_state(folder)
    run_classes = state.get("classes") or {}
    wanted = _export_labels(run, cfg.model.num_classes, run_classes, cfg.train.class_balance, classes, n)
    generator = load_generator(folder, ema=ema)
    discriminator, classifier, check = selection.judges(folder, cfg, seed)
    size = cfg.model.resolution
    train = heldout = None
    if audit:
        if not Path(cfg.data.path).exists():
            raise ConfigError(f"{cfg.data.path}: the run's training data is gone, so the memorization audit cannot "
                              "run; restore it, or pass --no-audit (recorded in the data card)")
        train = to_unit(load_real(cfg.data.path, split="train", size=size))
        if shards.is_shard_dir(Path(cfg.data.path)):
            val = load_real(cfg.data.path, split="val", size=size)
            heldout = to_unit(val) if len(val) else None
    images, labels, memorization, chosen = select(generator, wanted, n, seed, batch, train, heldout, selection,
                                                  discriminator, classifier)
    if check:
        chosen["class_check"].update(check)
    names = list(run_classes)
    counted = {"all": len(images)} if labels is None else \
        {names[i]: int((labels == i).sum()) for i in wanted.unique().tolist()}  # requested classes, kept slices
    card = {
        "synthetic": True,
        "generator": "hpcgan", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": str(run.resolve()), "checkpoint": str(folder.resolve()), "step": state["step"],
        "images_seen": state.get("images_seen"), "mlflow_run_id": state.get("mlflow_run_id"),
        "ema": ema, "seed": seed, "format": fmt, "count": len(images), "requested": n,
        "resolution": size, "arch": cfg.model.arch,
        "config_sha256": hashlib.sha256((folder / CONFIG_FILE).read_bytes()).hexdigest(),
        "classes": counted,
        **({"class_balance": cfg.train.class_balance} if labels is not None else {}),
        "source_data": {"path": cfg.data.path, "fingerprint": dataset_key(cfg.data.path)
                        if Path(cfg.data.path).exists() else None},
        "memorization": memorization,
        "selection": chosen,
    }
    _write(out, fmt, to_uint8(images)[:, 0].numpy(), None if labels is None else labels.tolist(), names, card)
    return card


def check_out_folder(out: Path) -> None:
    """Refuse an --out that cannot become a folder of ours before minutes of generating, not after."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: an existing file, not a folder; choose a folder path")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file, so no folder can be made there; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {existing} is not writable; choose a writable folder")


def _mark(card: dict[str, Any]) -> str:
    return (f"SYNTHETIC image made by hpcgan ({card['arch']}, step {card['step']}, seed {card['seed']}); "
            "not an image of a patient")


def _write(out: Path, fmt: str, images: np.ndarray, labels: list[int] | None, names: list[str],
           card: dict[str, Any]) -> None:
    """`labels`: each slice's class index (None from an unconditional run) into `names`, the run's classes."""
    out.mkdir(parents=True, exist_ok=True)
    classes = None if labels is None else [names[i] for i in labels]
    text = {"Description": _mark(card), "hpcgan:synthetic": "true"}
    if fmt == "png":
        for i, image in enumerate(images):
            folder = out if classes is None else out / classes[i]
            folder.mkdir(exist_ok=True)
            (folder / f"sample-{i:06d}.png").write_bytes(
                shards.encode_png(image, text if classes is None else {**text, "hpcgan:class": classes[i]}))
    elif fmt == "shards":
        metas = [{"synthetic": True, "index": i, "seed": card["seed"]} for i in range(len(images))]
        for meta, cls in zip(metas, classes or []):
            meta["class"] = cls  # as `hpcgan prepare` records it
        shards.write_shard_set(out, images, metas, {"synthetic": card}, png_text=text, labels=labels,
                               classes=names if labels is not None else ())
    else:
        import nibabel as nib

        stacks = {"": list(range(len(images)))} if classes is None else \
            {c: [i for i, x in enumerate(classes) if x == c] for c in dict.fromkeys(classes)}
        for cls, rows in stacks.items():
            volume = nib.Nifti1Image(np.ascontiguousarray(images[rows].transpose(2, 1, 0)[::-1, ::-1]), np.eye(4))
            volume.header["descrip"] = (f"SYNTHETIC hpcgan step {card['step']} seed {card['seed']}"
                                        + (f" class {cls}" if cls else "")).encode()[:79]
            nib.save(volume, out / (f"synthetic-{cls}.nii.gz" if cls else "synthetic.nii.gz"))
    (out / DATACARD).write_text(json.dumps(card, indent=1))
    (out / DATACARD_MD).write_text(_datacard_markdown(card))


def _datacard_markdown(card: dict[str, Any]) -> str:
    audit = card["memorization"]
    audit_line = (f"{audit['left_out']} slice(s) looked like training slices and were left out (thresholds "
                  f"calibrated {audit.get('memorization_calibration')}: RMS < {audit.get('memorization_l2_threshold', 0):.4g} "
                  f"or SSIM > {audit.get('memorization_ssim_threshold', 0):.4g})" if audit["audited"]
                  else "not run (--no-audit): slices were not checked against the training slices")
    return "\n".join([
        "# Synthetic MRI slices: data card", "",
        "**Every image in this folder is synthetic**, generated by a GAN trained with hpcgan. None is an image "
        "of a patient; do not use it as one.", "",
        f"- count: {card['count']} of {card['requested']} requested, {card['resolution']} px, format {card['format']}",
        f"- generator: {card['arch']}, {'EMA' if card['ema'] else 'raw'} weights at step {card['step']} "
        f"({card['images_seen']} images seen), seed {card['seed']}",
        f"- run: {card['run']} (MLflow run {card['mlflow_run_id']}), config sha256 {card['config_sha256'][:16]}",
        f"- trained on: {card['source_data']['path']} (fingerprint {card['source_data']['fingerprint']})",
        f"- classes: {', '.join(f'{k} {v}' for k, v in card['classes'].items())}"
        + (f" (train.class_balance={card['class_balance']})" if "class_balance" in card else ""),
        f"- memorization audit: {audit_line}",
        f"- selection: {selection_line(card['selection'])}",
        f"- created: {card['created']}", "",
        f"The machine-readable version is `{DATACARD}`.", ""])


def selection_line(chosen: dict[str, Any]) -> str:
    parts = []
    if d := chosen.get("discriminator"):
        parts.append(f"the discriminator's lowest-scored {d['quantile']:.0%} dropped ({d['kept']} of {d['candidates']} "
                     f"candidates kept, acceptance {d['acceptance_rate']:.2f}, lowest kept logit "
                     f"{d['lowest_kept_logit']:.3g})")
    if chosen["truncation_psi"] != 1:
        parts.append(f"styles truncated toward the average w (psi {chosen['truncation_psi']:g})")
    if chosen["truncation_z"]:
        parts.append(f"latent components with |z| > {chosen['truncation_z']:g} redrawn")
    if c := chosen.get("class_check"):
        accuracy = c.get("heldout_accuracy")
        parts.append(f"{c['dropped']} slice(s) whose class a classifier trained on real slices (held-out accuracy "
                     f"{'n/a' if accuracy is None else f'{accuracy:.3f}'}) gave a probability below {c['threshold']:g} "
                     "dropped and redrawn")
    return "; ".join(parts) or "every draw kept (no quality filter, no truncation)"
