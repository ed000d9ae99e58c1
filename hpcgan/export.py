"""`hpcgan sample`: a synthetic data set from a trained run, marked synthetic, with its data card.

Slices come from the run's EMA generator (or the raw one). Before anything is written, every slice is
audited against the run's training slices (nearest neighbour by RMS distance and SSIM, thresholds
calibrated on held-out real slices): a slice that looks copied is left out, counted, and replaced by a
fresh draw, so a synthetic set never ships a near-duplicate of a patient slice. Every file is marked
synthetic where its format allows (PNG text chunk, NIfTI description, shard manifest), and the folder
carries `datacard.json` (machine-readable provenance) beside `DATACARD.md` (for people). Shards are in
the format `hpcgan train --data` reads, so synthetic and real shards train alike.

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
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcgan.config import ConfigError
from hpcgan.data import load_real, shards
from hpcgan.data.pixels import to_unit, to_uint8
from hpcgan.train.checkpoint import CheckpointManager, resolve_checkpoint
from hpcgan.train.conditioning import allocate
from hpcgan.train.evaluation import dataset_key
from hpcgan.train.generator import load_generator
from hpcgan.train.run_folder import CONFIG_FILE, config_of
from hpcgan.train.samples import generate

log = logging.getLogger(__name__)

FORMATS = ("png", "shards", "nifti")
DATACARD, DATACARD_MD = "datacard.json", "DATACARD.md"
MAX_ROUNDS = 5  # draws to replace slices the audit left out


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


def run(args: argparse.Namespace) -> int:
    card = export(Path(args.run), Path(args.out), n=args.n, fmt=args.format, seed=args.seed, ema=not args.no_ema,
                  batch=args.batch, audit=not args.no_audit, classes=args.classes)
    left_out = card["memorization"].get("left_out", 0)
    print(f"wrote {card['count']} synthetic slices ({args.format}) to {args.out}"
          + (f"; {left_out} left out by the memorization audit" if left_out else "")
          + f"; data card {Path(args.out) / DATACARD}")
    return 0


def _draw(generator: torch.nn.Module, n: int, seed: int, batch: int, labels: torch.Tensor | None) -> torch.Tensor:
    z = torch.randn(n, generator.nz, generator=torch.Generator().manual_seed(seed))
    return generate(generator, z, labels, batch=batch, seed=seed)


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


def _audited(generator: torch.nn.Module, labels: torch.Tensor | None, n: int, seed: int, batch: int,
             train: torch.Tensor | None, heldout: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """`n` slices, of the classes `labels` asks for, none of which the audit flags (fewer only if
    MAX_ROUNDS draws cannot supply them): a slice left out is replaced by a fresh one of its class."""
    from hpcgan.metrics.memorization import memorization_audit

    if train is None:
        return _draw(generator, n, seed, batch, labels), labels, {"audited": False}
    kept, kept_labels, wanted, left_out, summary = [], [], labels, 0, {}
    for round_ in range(MAX_ROUNDS):
        missing = n - sum(len(k) for k in kept)
        if missing <= 0:
            break
        fake = _draw(generator, missing, seed + 7919 * round_, batch, wanted)
        result = memorization_audit(train, fake, heldout=heldout)
        keep = ~result.flagged.cpu()
        kept.append(fake[keep])
        if wanted is not None:
            kept_labels.append(wanted[keep])
            wanted = wanted[~keep]
        left_out += int((~keep).sum())
        summary = {k: v for k, v in result.summary().items() if not k.endswith("_png")}
    return (torch.cat(kept)[:n], torch.cat(kept_labels) if labels is not None else None,
            {"audited": True, "left_out": left_out, "rounds": round_ + 1, **summary})


def export(run: Path, out: Path, *, n: int, fmt: str, seed: int = 0, ema: bool = True, batch: int = 256,
           audit: bool = True, classes: Sequence[str] = ()) -> dict[str, Any]:
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
    images, labels, memorization = _audited(generator, wanted, n, seed, batch, train, heldout)
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
        f"- created: {card['created']}", "",
        f"The machine-readable version is `{DATACARD}`.", ""])
