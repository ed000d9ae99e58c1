"""`hpcgan prepare SRC... --out SHARD_DIR`: MRI sources -> split, shuffled WebDataset shards.

The work is resumable, in three phases under SHARD_DIR/.prepare/<fingerprint>/ (the fingerprint covers
the input contents and every setting):
1. process: each unit (one volume, or a batch of 2D images) is decoded and preprocessed in a worker
   process; its PNGs go to units/<n>.bin and its records to units/<n>.json, written last. Done units
   are skipped on resume.
2. write: every slice gets its split (by subject, or by slabs, which needs every volume's kept slices),
   each split's samples are put in a seeded order and cut into shards, each written to a .part file,
   renamed, and recorded in shards.json. Recorded shards are skipped on resume.
3. manifest.json is written last; a re-run whose fingerprint matches it is a no-op.

With `--labels` every sample also holds its class index as a `cls` member (classes sorted by name,
listed in the manifest), and the subject split is stratified by class.

Source paths in the manifest are relative to their SRC; with `--anonymize` (the default for DICOM and
label tables) there are none, subject ids are salted hashes, and folder names are dropped (see anonymize.py).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from hpcgan.data import anonymize as anon, dicom, inputs, shards
from hpcgan.data.inputs import Problem, Volume
from hpcgan.data.labels import LabelError, check_source, classify, is_table
from hpcgan.data.preprocess import AXES, CROPS, Settings, Slice, image_slices, volume_slices
from hpcgan.data.reader import DataError
from hpcgan.data.split import assign_splits, slab_role, val_slabs

_IMAGES_PER_UNIT = 256  # 2D images are processed in batches, so resume state stays a few files
_WORK = ".prepare"
SPLIT_METHODS = ("subject", "slab")


@dataclass
class Options:
    """Everything `prepare` needs besides the pixel settings."""

    val_frac: float = 0.1
    seed: int = 0
    shard_size: int = 1000
    subject_regex: str | None = None
    workers: int = field(default_factory=lambda: min(8, len(os.sched_getaffinity(0))))  # the CPUs this process may use
    strict: bool = False
    progress: bool = True
    split: str = "subject"  # subject | slab
    slab_gap: int = 4  # slices on each side of a val slab that go to neither split
    slabs: int = 3  # val slabs per volume axis
    labels: str | None = None  # folder | axis | contrast | a .csv table; None: no classes
    anonymize: bool | None = None  # None: on for DICOM and label tables
    salt: str | None = None  # of the subject ids under anonymize; None: random per build

    def __post_init__(self) -> None:
        """One-line errors named after the `prepare` option to fix."""
        if self.split not in SPLIT_METHODS:
            raise ValueError(f"--split {self.split}: choose from {', '.join(SPLIT_METHODS)}")
        if not 0.0 <= self.val_frac < 1.0:
            raise ValueError(f"--val-frac {self.val_frac}: must be in [0, 1)")
        for option, value in (("--shard-size", self.shard_size), ("--workers", self.workers),
                              ("--slabs", self.slabs)):
            if value < 1:
                raise ValueError(f"{option} {value}: must be at least 1")
        if self.slab_gap < 0:
            raise ValueError(f"--slab-gap {self.slab_gap}: must be 0 or more slices")
        if self.labels is not None:
            check_source(self.labels)


@dataclass
class Report:
    exit_code: int
    up_to_date: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


@dataclass(frozen=True)
class _Task:
    number: int
    volumes: tuple[Volume, ...]
    subjects: tuple[str, ...]  # per volume: the subject id written to samples
    settings: Settings
    unit_dir: Path
    axis_labels: bool  # each slice's class is its axis (else its volume's class, if any)
    anonymize: bool  # no source path or folder name in the records


# ---------------------------------------------------------------------------------------------- phase 1

def _slices(volume: Volume, settings: Settings) -> tuple[list[tuple[str, Slice]], int, list[Problem], str]:
    """(volume id, slice) pairs of one input, skipped-slice count, dropped files, modality."""
    if volume.kind == "image":
        kept, skipped = image_slices(inputs.read_image(volume.files[0]), settings)
        return [(volume.volume_id, s) for s in kept], skipped, [], ""
    if volume.kind == "nifti":
        data, zooms = inputs.read_nifti(volume.files[0])
        frames = [(volume.volume_id, data)] if data.ndim == 3 else \
            [(f"{volume.volume_id}-t{t:03d}", data[..., t]) for t in range(data.shape[3])]
        out: list[tuple[str, Slice]] = []
        skipped = 0
        for volume_id, frame in frames:
            kept, n = volume_slices(frame, zooms, settings)
            out += [(volume_id, s) for s in kept]
            skipped += n
        return out, skipped, [], ""
    series = dicom.load_series(list(volume.files))
    dropped = [Problem(str(path), reason) for path, reason in series.dropped]
    kept, skipped = volume_slices(series.data, series.zooms, settings)
    return [(volume.volume_id, s) for s in kept], skipped, dropped, series.modality


def _relative_path(volume: Volume) -> str:
    """The file as found under its SRC (never absolute: where the data lives, and whose it is, stays home)."""
    file = volume.files[0]
    root = volume.root
    return str(file.relative_to(root)) if root.is_dir() and file.is_relative_to(root) else file.name


def _process_unit(task: _Task) -> int:
    """Preprocess one unit into units/<n>.bin + units/<n>.json (the json last: it marks the unit done)."""
    samples: list[dict[str, Any]] = []
    problems: list[Problem] = []
    sources: list[dict[str, Any]] = []
    skipped = duplicates = 0
    blob = bytearray()
    for volume, subject in zip(task.volumes, task.subjects, strict=True):
        try:
            kept, n_skipped, dropped, modality = _slices(volume, task.settings)
        except DataError as err:
            problems.append(Problem(volume.display, str(err)))
            continue
        except Exception as err:  # noqa: BLE001 - one odd file must not stop the run
            detail = "" if volume.kind == "dicom" else f": {err}"  # DICOM messages may quote headers
            problems.append(Problem(volume.display, f"unexpected {type(err).__name__}{detail}"))
            continue
        problems += dropped
        skipped += n_skipped
        seen: set[tuple[str, bytes]] = set()  # a symmetric template's sagittal slices come in equal pairs
        unique = []
        for volume_id, piece in kept:
            digest = (volume_id, hashlib.sha256(next(iter(piece.pngs.values()))).digest())
            if digest not in seen:
                seen.add(digest)
                unique.append((volume_id, piece))
        duplicates += len(kept) - len(unique)
        kept = unique
        source = {"kind": volume.kind, "volume": volume.volume_id, "sha256": volume.sha256,
                  "contrast": volume.contrast, "slices": len(kept)}
        if volume.kind == "dicom":
            source |= {"files": len(volume.files), "modality": modality}
        elif not task.anonymize:
            source["path"] = _relative_path(volume)
        sources.append(source)
        for volume_id, piece in kept:
            meta = {"source_sha256": volume.sha256, "volume": volume_id, "subject": subject,
                    "kind": volume.kind, "axis": piece.axis, "slice": piece.index, "contrast": volume.contrast}
            if not task.anonymize:
                meta["label"] = volume.label  # the folder holding the file
            if modality:
                meta["modality"] = modality
            if cls := piece.axis if task.axis_labels else volume.cls:
                meta["class"] = cls
            pngs = {}
            for size, png in piece.pngs.items():
                pngs[str(size)] = [len(blob), len(png)]
                blob += png
            samples.append({"key": f"{volume_id}-{piece.axis}-{piece.index:04d}", "length": piece.length,
                            "meta": meta, "pngs": pngs})
    stem = task.unit_dir / f"u{task.number:06d}"
    stem.with_suffix(".bin").write_bytes(bytes(blob))
    record = {"samples": samples, "skipped": skipped, "duplicates": duplicates, "sources": sources,
              "problems": [[p.source, p.reason] for p in problems]}
    tmp = stem.with_suffix(".json.part")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, stem.with_suffix(".json"))
    return task.number


def _run_units(tasks: list[_Task], workers: int, progress: bool) -> None:
    todo = [t for t in tasks if not (t.unit_dir / f"u{t.number:06d}.json").is_file()]
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="preprocess", unit="unit",
               disable=None if progress else True, file=sys.stderr)
    with bar:
        if workers <= 1 or len(todo) <= 1:
            for task in todo:
                _process_unit(task)
                bar.update()
            return
        # forkserver with this module preloaded: workers start fast and never inherit threads
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context) as pool:
            for future in as_completed([pool.submit(_process_unit, t) for t in todo]):
                future.result()
                bar.update()


# ---------------------------------------------------------------------------------------------- phase 2

class _UnitReader:
    """Random access to the PNG bytes stored by phase 1, one open file per unit."""

    def __init__(self, unit_dir: Path) -> None:
        self.unit_dir = unit_dir
        self.files: dict[int, Any] = {}

    def read(self, unit: int, offset: int, length: int) -> bytes:
        if unit not in self.files:
            self.files[unit] = open(self.unit_dir / f"u{unit:06d}.bin", "rb")
        f = self.files[unit]
        f.seek(offset)
        return f.read(length)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _write_shards(samples: list[tuple[int, dict[str, Any]]], out: Path, work: Path, sizes: tuple[int, ...],
                  classes: list[str], options: Options) -> list[dict[str, Any]]:
    progress_file = work / "shards.json"
    done = {r["name"]: r for r in json.loads(progress_file.read_text())} if progress_file.is_file() else {}
    plan: list[tuple[str, list[tuple[int, dict[str, Any]]]]] = []
    for number, split in enumerate(shards.SPLITS):
        members = sorted((s for s in samples if s[1]["split"] == split), key=lambda s: s[1]["key"])
        order = np.random.default_rng([options.seed, number]).permutation(len(members))
        members = [members[i] for i in order]
        for start in range(0, len(members), options.shard_size):
            plan.append((split, members[start:start + options.shard_size]))
    records: list[dict[str, Any]] = []
    reader = _UnitReader(work / "units")
    bar = tqdm(plan, desc="write shards", unit="shard", disable=None if options.progress else True,
               file=sys.stderr)
    numbers = Counter[str]()
    index = {name: str(i).encode() for i, name in enumerate(classes)}
    try:
        for split, members in bar:
            name = shards.shard_name(split, numbers[split])
            numbers[split] += 1
            tar = out / name
            record = done.get(name)
            if record and tar.is_file() and tar.stat().st_size == record["bytes"] \
                    and shards.index_path(tar).is_file():
                records.append(record)
                continue
            writer = shards.ShardWriter(tar)
            for unit, sample in members:
                parts = {shards.png_key(size): reader.read(unit, *sample["pngs"][str(size)]) for size in sizes}
                if classes:
                    parts["cls"] = index[sample["meta"]["class"]]
                parts["json"] = json.dumps(sample["meta"], sort_keys=True).encode()
                writer.add(sample["key"], parts)
            record = writer.close() | {"split": split}
            records.append(record)
            done[name] = record
            tmp = progress_file.with_suffix(".part")
            tmp.write_text(json.dumps(list(done.values())))
            os.replace(tmp, progress_file)
    finally:
        reader.close()
    return records


# ---------------------------------------------------------------------------------------------- driver

def _fingerprint(volumes: list[Volume], settings: Settings, options: Options, anonymize: bool) -> str:
    spec = {
        "format": shards.FORMAT, "settings": settings.to_json(), "val_frac": options.val_frac,
        "seed": options.seed, "shard_size": options.shard_size, "subject_regex": options.subject_regex,
        "split": [options.split] + ([options.slab_gap, options.slabs] if options.split == "slab" else []),
        "volumes": [[v.kind, v.sha256, v.label, v.contrast, hashlib.sha256(v.subject_key.encode()).hexdigest()]
                    for v in volumes],
    }
    if options.labels is not None:  # only then, so that unlabelled shard folders stay up to date
        spec["labels"] = [options.labels, [v.cls for v in volumes]]
    if anonymize:  # likewise
        spec["anonymize"] = hashlib.sha256(options.salt.encode()).hexdigest() if options.salt is not None else True
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _up_to_date(out: Path, fingerprint: str) -> bool:
    try:
        manifest = shards.read_manifest(out)
    except DataError:
        return False
    if manifest.get("fingerprint") != fingerprint:
        return False
    return all((out / r["name"]).is_file() and (out / r["name"]).stat().st_size == r["bytes"]
               and (out / r["index"]).is_file() for r in manifest["shards"])


def _shard_files(out: Path) -> list[Path]:
    return [p for split in shards.SPLITS for p in out.glob(f"{split}-*") if p.is_file()]


def _subject_ids(volumes: list[Volume]) -> dict[str, str]:
    """Subject key -> an id derived from its volumes' content hashes (never from a name or patient ID)."""
    members: dict[str, list[str]] = {}
    for v in volumes:
        members.setdefault(v.subject_key, []).append(v.volume_id)
    return {key: "subj-" + hashlib.sha256(" ".join(sorted(ids)).encode()).hexdigest()[:12]
            for key, ids in members.items()}


def _tasks(volumes: list[Volume], subject_ids: dict[str, str], settings: Settings, unit_dir: Path,
           anonymize: bool, axis_labels: bool) -> list[_Task]:
    groups: list[list[Volume]] = []
    images = [v for v in volumes if v.kind == "image"]
    groups += [images[i:i + _IMAGES_PER_UNIT] for i in range(0, len(images), _IMAGES_PER_UNIT)]
    groups += [[v] for v in volumes if v.kind != "image"]
    return [_Task(n, tuple(g), tuple(subject_ids[v.subject_key] for v in g), settings, unit_dir, axis_labels,
                  anonymize)
            for n, g in enumerate(groups)]


def _split_samples(samples: list[dict[str, Any]], sources: list[dict[str, Any]], volumes: list[Volume],
                   subject_ids: dict[str, str], options: Options) -> dict[str, Any]:
    """Set every sample's "split" (train, val, or gap: neither) and every source's; return the manifest's
    record of the split.

    Slab split: slices of one axis of one voxel grid (volumes with as many slices along it: the frames
    of a 4D file, co-registered maps) share their val slabs, placed over the extent of their kept
    slices. What has no neighbouring slices (2D images, one-slice series) is split by subject, stratified
    by each subject's majority class (the slab split holds out slices of every volume, hence of every
    class, by itself).
    """
    slab = options.split == "slab"
    by_slab = [s for s in samples if slab and s["length"] > 1]
    flat = [s for s in samples if not (slab and s["length"] > 1)]
    flat_sources = {s["meta"]["source_sha256"] for s in flat}
    usable = {s["meta"]["source_sha256"] for s in samples}  # a bad input's subject must not take a val place
    by_subject = [v for v in volumes
                  if v.sha256 in usable and (not slab or v.kind == "image" or v.sha256 in flat_sources)]
    keys = {subject_ids[v.subject_key]: v.subject_key for v in volumes}
    votes = Counter((keys[s["meta"]["subject"]], s["meta"]["class"]) for s in flat if "class" in s["meta"])
    strata: dict[str, str] = {}
    for (subject, cls), _ in sorted(votes.items(), key=lambda item: (-item[1], item[0])):
        strata.setdefault(subject, cls)
    assigned = assign_splits({v.subject_key for v in by_subject}, options.val_frac, options.seed, strata)
    for sample in flat:
        sample["split"] = assigned[keys[sample["meta"]["subject"]]]
    no_subject = any(v.kind == "image" and not v.has_subject for v in volumes)
    record: dict[str, Any] = {"method": options.split, "val_frac": options.val_frac, "seed": options.seed,
                              "subject_regex": options.subject_regex,
                              "unit": "slab" if slab else "file" if no_subject else "subject"}
    if slab:
        grids: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for sample in by_slab:
            grids.setdefault((sample["meta"]["axis"], sample["length"]), []).append(sample)
        layout = []
        for (axis, length), members in sorted(grids.items()):
            indices = [m["meta"]["slice"] for m in members]
            slabs = val_slabs(min(indices), max(indices), options.val_frac, options.slabs, options.slab_gap,
                              key=f"{options.seed}\0{axis}\0{length}")
            layout.append({"axis": axis, "length": length, "val": [[r.start, r.stop] for r in slabs]})
            for member in members:
                member["split"] = slab_role(member["meta"]["slice"], slabs, options.slab_gap)
        record |= {"slab_gap": options.slab_gap, "slabs": options.slabs, "val_slabs": layout}
    subject_of = {v.sha256: v.subject_key for v in volumes if v.subject_key in assigned}
    roles = Counter((s["meta"]["source_sha256"], s["split"]) for s in by_slab)
    for source in sources:
        if source["sha256"] in subject_of:
            source["split"] = assigned[subject_of[source["sha256"]]]
        elif not source["slices"]:
            source["split"] = "none"
        else:
            source["split"] = "slab"
            source["split_slices"] = {r: roles[source["sha256"], r] for r in ("train", "val", "gap")}
    return record


def prepare(sources: list[Path], out: Path, settings: Settings, options: Options,
            echo: Callable[[str], None] = print) -> Report:
    """Build (or resume, or confirm) the shard folder `out` from `sources`.

    Runs under an exclusive lock on `out`, so ranks that all ask for the same shards (e.g. the
    quickstart) wait for the first to write them and then find them up to date.
    """
    out = Path(out)
    (out / _WORK).mkdir(parents=True, exist_ok=True)
    with open(out / _WORK / "lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: run unguarded, as one process usually does
            pass
        return _prepare(sources, out, settings, options, echo)


def _prepare(sources: list[Path], out: Path, settings: Settings, options: Options,
             echo: Callable[[str], None]) -> Report:
    work_root = out / _WORK
    regex = re.compile(options.subject_regex) if options.subject_regex else None
    hashes = inputs.HashCache(work_root / "hashes.json")
    found = inputs.discover([Path(s) for s in sources], subject_regex=regex, exclude=out,
                            workers=options.workers, hashes=hashes, echo=echo)
    problems = list(found.problems)
    volumes = found.volumes
    kinds = Counter(v.kind for v in volumes)
    echo(f"found {len(volumes)} inputs ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items())) or 'none'})"
         + (f", {found.duplicates} duplicate files skipped" if found.duplicates else "")
         + (f", {found.ignored} other files ignored" if found.ignored else ""))
    if not volumes:
        _report_problems(problems, echo)
        echo("error: nothing usable found; nothing written")
        return Report(1, problems=problems)
    if options.split == "slab" and kinds["image"] == len(volumes):
        echo(f"error: --split slab: all {len(volumes)} inputs are 2D images, which have no neighbouring slices "
             "to keep apart; use --split subject (the default)")
        return Report(2, problems=problems)
    if options.labels is not None:
        volumes = classify(volumes, options.labels)
    hashes.save()

    anonymize = options.anonymize if options.anonymize is not None else anon.default_on(volumes, options.labels)
    fingerprint = _fingerprint(volumes, settings, options, anonymize)
    if _up_to_date(out, fingerprint):
        _report_problems(problems, echo)
        bad = shards.read_manifest(out)["bad_inputs"]
        echo(f"{out}: up to date (same inputs and settings); nothing to do"
             + (f" ({bad} bad inputs were skipped when it was built)" if bad else ""))
        return Report(0, up_to_date=True, problems=problems)

    work = work_root / fingerprint[:16]
    if not work.is_dir():  # a fresh build: what is there belongs to other inputs or settings
        (out / shards.MANIFEST).unlink(missing_ok=True)
        for path in _shard_files(out):
            path.unlink()
    else:
        echo(f"resuming the interrupted run in {work}")
    for stale in work_root.iterdir() if work_root.is_dir() else []:
        if stale.is_dir() and stale != work:
            shutil.rmtree(stale)
    (work / "units").mkdir(parents=True, exist_ok=True)

    no_subject = [v for v in volumes if v.kind == "image" and not v.has_subject]
    if no_subject:
        echo(f"note: {len(no_subject)} of {kinds['image']} 2D images have no subject (no DICOM/NIfTI "
             "source, BIDS sub-XX folder or --subject-regex match): their split is per file, so slices "
             "of one brain may fall in both train and val")
    if options.split == "slab" and kinds["image"]:
        echo(f"note: --split slab: the {kinds['image']} 2D images have no neighbouring slices; they are split "
             "by subject")
    salt = anon.salt_for(work, options.salt) if anonymize else None
    subject_ids = anon.subject_ids(volumes, salt) if salt is not None else _subject_ids(volumes)
    tasks = _tasks(volumes, subject_ids, settings, work / "units", anonymize, options.labels == "axis")
    _run_units(tasks, options.workers, options.progress)

    samples: list[tuple[int, dict[str, Any]]] = []
    sources_list: list[dict[str, Any]] = []
    skipped = duplicates = 0
    for task in tasks:
        record = json.loads((task.unit_dir / f"u{task.number:06d}.json").read_text())
        samples += [(task.number, s) for s in record["samples"]]
        sources_list += record["sources"]
        skipped += record["skipped"]
        duplicates += record["duplicates"]
        problems += [Problem(*p) for p in record["problems"]]
    _report_problems(problems, echo)
    split = _split_samples([s for _, s in samples], sources_list, volumes, subject_ids, options)
    short = [f"{g['axis']} of {g['length']} slices" for g in split.get("val_slabs", []) if not g["val"]]
    if short and options.val_frac > 0:
        echo(f"note: {len(short)} volume axes ({', '.join(short)}) are too short for a val slab with "
             f"--val-frac {options.val_frac} and --slab-gap {options.slab_gap}: all their slices went to train")
    counts = Counter(s["split"] for _, s in samples)
    if options.strict and problems:
        echo(f"error: {len(problems)} bad inputs and --strict given; no shards written")
        return Report(1, counts=dict(counts), problems=problems)
    if not counts["train"]:
        echo("error: no usable training slices (all inputs failed or held too little foreground)")
        return Report(1, counts=dict(counts), problems=problems)
    if options.val_frac > 0 and not counts["val"]:
        usable = len({s["meta"]["subject"] for _, s in samples})
        cause = f"{len(problems)} bad input(s) (listed above) left" if problems else "the inputs hold"
        echo(f"warning: the val split is empty: {cause} {usable} usable subject(s), and val needs a subject of its "
             "own; add subjects, or use --split slab to hold out slices of each volume")

    per_split = {name: [s["meta"] for _, s in samples if s["split"] == name] for name in shards.SPLITS}
    class_counts = {name: dict(sorted(Counter(m["class"] for m in metas if "class" in m).items()))
                    for name, metas in per_split.items()}
    classes = sorted({c for counted in class_counts.values() for c in counted})
    for name in shards.SPLITS if counts["val"] else ():
        if absent := [c for c in classes if c not in class_counts[name]]:
            echo(f"note: no {name} slices of class {', '.join(absent)}: too few of their subjects (or slices) "
                 "to put some in both splits")
    records = _write_shards(samples, out, work, settings.sizes, classes, options)
    keep = {r["name"] for r in records} | {r["index"] for r in records}
    for path in _shard_files(out):
        if path.name not in keep:
            path.unlink()
    manifest = {
        "format": shards.FORMAT,
        "fingerprint": fingerprint,
        "sizes": list(settings.sizes),
        "bit_depth": settings.bit_depth,
        "channels": 1,
        "settings": settings.to_json(),
        "split": split,
        "counts": {name: len(metas) for name, metas in per_split.items()},
        "volumes": {name: len({m["source_sha256"] for m in metas}) for name, metas in per_split.items()},
        "subjects": {name: len({m["subject"] for m in metas}) for name, metas in per_split.items()},
        "contrasts": {name: dict(sorted(Counter(m["contrast"] for m in metas).items()))
                      for name, metas in per_split.items()},
        "kinds": {name: dict(sorted(Counter(m["kind"] for m in metas).items())) for name, metas in per_split.items()},
        "classes": classes,
        "label_source": Path(options.labels).name if options.labels and is_table(options.labels) else options.labels,
        "anonymized": anonymize,
        "class_counts": class_counts,
        "skipped_slices": skipped,
        "duplicate_slices": duplicates,
        "gap_slices": counts["gap"],
        "bad_inputs": len(problems),
        "shards": records,
        **({} if anonymize else {"roots": [Path(s).resolve().name for s in sources]}),
        "sources": sources_list,
    }
    shards.write_manifest(out, manifest)
    shutil.rmtree(work)
    if salt is not None:
        echo(f"subject key (subject -> id, and the salt; keep it private, apart from the shards): "
             f"{anon.write_key(out, salt, volumes, subject_ids)}")
    echo(f"wrote {out}: train {counts['train']} images ({manifest['subjects']['train']} subjects), "
         f"val {counts['val']} images ({manifest['subjects']['val']} subjects) in {len(records)} shards; "
         + (f"{counts['gap']} slices left out in the gaps around val slabs, " if options.split == "slab" else "")
         + f"{skipped} slices skipped (too little foreground), {duplicates} identical slices of one volume "
         f"stored once; {len(problems)} bad inputs"
         + (f"; classes (--labels {options.labels}): {', '.join(classes)}" if classes else ""))
    return Report(0, counts=dict(counts), problems=problems)


def _report_problems(problems: list[Problem], echo: Callable[[str], None]) -> None:
    for p in problems:
        echo(f"bad input: {p.source}: {p.reason}")


# ---------------------------------------------------------------------------------------------- CLI

def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers separated by commas, e.g. 64,128") from None


def _axes(text: str) -> tuple[str, ...]:
    axes = tuple(a.strip() for a in text.split(","))
    if not axes or any(a not in AXES for a in axes):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(AXES)}")
    return axes


def _percentiles(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LOW,HIGH percentiles, e.g. 0.5,99.5") from None
    return lo, hi


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `hpcgan prepare` options (registered by hpcgan/cli.py)."""
    d = Settings()
    o = Options()
    parser.add_argument("sources", nargs="+", type=Path, metavar="SRC",
                        help="folders or files: PNG/JPG/TIFF images, NIfTI volumes, DICOM series (mixed ok)")
    parser.add_argument("--out", required=True, type=Path, metavar="SHARD_DIR", help="shard folder to write")
    parser.add_argument("--size", type=_ints, default=d.sizes, metavar="N[,N...]",
                        help="target size(s) in pixels; each sample holds one PNG per size (default 64)")
    parser.add_argument("--axes", type=_axes, default=d.axes, metavar="A[,A...]",
                        help="slice volumes along these axes (default axial,coronal,sagittal)")
    parser.add_argument("--val-frac", type=float, default=o.val_frac,
                        help="fraction held out for validation: of the subjects, or with --split slab of each "
                             "volume axis's slices (default 0.1)")
    parser.add_argument("--split", choices=SPLIT_METHODS, default=o.split,
                        help="keep whole subjects apart (default), or, for collections of few subjects, hold "
                             "out slabs of slices of every volume (2D images are still split by subject)")
    parser.add_argument("--slab-gap", type=int, default=o.slab_gap, metavar="N",
                        help=f"--split slab: slices on each side of a val slab left out of both splits, so "
                             f"near-identical neighbours never straddle the split (default {o.slab_gap})")
    parser.add_argument("--slabs", type=int, default=o.slabs, metavar="K",
                        help=f"--split slab: val slabs per volume axis, spread over the brain (default {o.slabs})")
    parser.add_argument("--shard-size", type=int, default=o.shard_size, help="samples per shard (default 1000)")
    parser.add_argument("--workers", type=int, default=o.workers,
                        help="preprocessing processes (default: the CPU count, at most 8)")
    parser.add_argument("--seed", type=int, default=o.seed, help="seed of the split and the shuffle")
    parser.add_argument("--subject-regex", default=None, metavar="REGEX",
                        help="subject from the file name of 2D images or volumes (group 1, else the match), "
                             r"e.g. '^(\d+)_' for 12_3.png")
    parser.add_argument("--clip", type=_percentiles, default=d.clip, metavar="LOW,HIGH",
                        help="intensity percentiles of each volume's foreground mapped to black/white "
                             "(default 0.5,99.5)")
    parser.add_argument("--foreground-threshold", type=float, default=d.foreground_threshold,
                        help="normalised intensity above which a pixel is brain (default 0.05)")
    parser.add_argument("--min-foreground", type=float, default=d.min_foreground,
                        help="skip slices whose square crop is less brain than this (default 0.1)")
    parser.add_argument("--crop", choices=CROPS, default=d.crop,
                        help="crop to the brain's bounding box over the whole volume (keeps scale within "
                             "a volume), per slice, or not at all (default volume)")
    parser.add_argument("--bit-depth", type=int, choices=(8, 16), default=d.bit_depth, help="PNG bit depth")
    parser.add_argument("--strict", action="store_true", help="fail (exit 1, no shards) on any bad input")
    parser.add_argument("--labels", default=None, metavar="SOURCE",
                        help="a class per slice, stored with it: folder (SRC/<class>/...), axis (axial, coronal, "
                             "sagittal), contrast (from the file name), or a .csv table with the columns class "
                             "and path (a file) or subject (default: no classes)")
    parser.add_argument("--anonymize", action=argparse.BooleanOptionalAction, default=None,
                        help="salted-hash subject ids, no source paths or folder names in the shards; the subject "
                             "key is written beside SHARD_DIR (default: on for DICOM inputs and --labels tables)")
    parser.add_argument("--salt", default=None, help="--anonymize: the salt of the subject ids (default: random "
                                                     "per build, saved in the subject key)")


def run(args: argparse.Namespace) -> int:
    try:
        settings = Settings(sizes=args.size, axes=args.axes, clip=args.clip,
                            foreground_threshold=args.foreground_threshold, min_foreground=args.min_foreground,
                            crop=args.crop, bit_depth=args.bit_depth)
        options = Options(val_frac=args.val_frac, seed=args.seed, shard_size=args.shard_size,
                          subject_regex=args.subject_regex, workers=args.workers, strict=args.strict,
                          split=args.split, slab_gap=args.slab_gap, slabs=args.slabs, labels=args.labels,
                          anonymize=args.anonymize, salt=args.salt)
        if args.subject_regex:
            re.compile(args.subject_regex)
    except (ValueError, re.error) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return prepare(args.sources, args.out, settings, options).exit_code
    except LabelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
