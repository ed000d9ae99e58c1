"""Classes of slices for `hpcgan prepare --labels SOURCE`, so that conditional models and downstream
classifiers have something to condition on.

SOURCE is `folder` (the first folder level under each SRC: `SRC/yes/...`, the ImageFolder layout),
`axis` (each slice's slicing axis, set per slice by `prepare`), `contrast` (the contrast its file name
states), or a CSV table with a header row and the columns `class` and either `path` (an input file,
relative to a SRC folder or absolute) or `subject` (a subject id as the data names it: `sub-01`, a
`--subject-regex` match, a DICOM PatientID). An input the source cannot classify, or a table row that
names nothing, stops `prepare` with one line (`LabelError`) naming the file, the row and the fix:
silently unlabelled slices would train a conditional model on a wrong class.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Hashable
from dataclasses import replace
from pathlib import Path

from hpcgan.data.inputs import Volume
from hpcgan.data.reader import DataError

LABEL_SOURCES = ("folder", "axis", "contrast")  # or a path to a .csv table
_KEYS = ("path", "subject")


class LabelError(DataError):
    """A label source that cannot give every input one class; the message names the file (and row)."""


def is_table(source: str) -> bool:
    return source.lower().endswith(".csv")


def check_source(source: str) -> None:
    """A ValueError naming `--labels` unless `source` is a known source or a .csv path."""
    if source not in LABEL_SOURCES and not is_table(source):
        raise ValueError(f"--labels {source}: choose {', '.join(LABEL_SOURCES)}, or a .csv table with the "
                         "columns class and path (or subject)")


def classify(volumes: list[Volume], source: str) -> list[Volume]:
    """`volumes` with their class (`cls`) from `source`; with `axis` they are returned as they are (each
    slice's class is its axis), after checking that none is a 2D image."""
    if source == "axis":
        images = [v for v in volumes if v.kind == "image"]
        if images:
            raise LabelError(f"--labels axis: {images[0].display} is a 2D image ({len(images)} of the inputs are), "
                             "which has no slicing axis; use --labels folder or a table, or leave 2D images out")
        return volumes
    if source == "folder":
        return [replace(v, cls=_folder(v)) for v in volumes]
    if source == "contrast":
        return [replace(v, cls=_contrast(v)) for v in volumes]
    return _Table(Path(source)).classify(volumes)


def _folder(volume: Volume) -> str:
    folders = set()
    for file in volume.files:
        parts = file.relative_to(volume.root).parts if volume.root.is_dir() and file.is_relative_to(volume.root) \
            else ()
        if len(parts) < 2:
            raise LabelError(f"--labels folder: {volume.display} lies directly in {volume.root}, not in a class "
                             f"folder: move it into {volume.root}/<class>/, or label it with a table")
        folders.add(parts[0])
    if len(folders) > 1:
        raise LabelError(f"--labels folder: {volume.display} spans the class folders {', '.join(sorted(folders))}: "
                         "keep each series in one class folder, or label it with a table")
    return folders.pop()


def _contrast(volume: Volume) -> str:
    if not volume.contrast:
        how = "DICOM carries its contrast in free-text headers, which prepare does not read" \
            if volume.kind == "dicom" else "its file name names none (T1w, FLAIR, GM, ...)"
        raise LabelError(f"--labels contrast: {volume.display} has no contrast ({how}): rename it "
                         "(e.g. sub-01_T1w.nii.gz) or label it with a table")
    return volume.contrast


class _Table:
    """A label table: rows of (key, class) with their row numbers (the header is row 1, as a spreadsheet
    counts), keyed by file path or by subject."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise LabelError(f"--labels {path}: no such file; give a CSV table, or folder, axis or contrast") from None
        except (OSError, UnicodeDecodeError) as err:
            raise LabelError(f"{path}: cannot read it as UTF-8 text ({type(err).__name__}); save it as a "
                             "UTF-8 CSV file") from None
        rows = csv.reader(text.splitlines())
        try:
            header = [h.strip().lower() for h in next(rows, [])]
            columns = [k for k in _KEYS if k in header]
            if "class" not in header or len(columns) != 1:
                problem = f"both {' and '.join(_KEYS)} columns, keep one" if len(columns) > 1 else \
                    f"no {'class' if columns else ' or '.join(_KEYS)} column"
                raise self.error(1, f"{problem} (columns: {', '.join(header) or 'none'}); the first row names "
                                    "the columns: class, and path (a file) or subject")
            self.kind = columns[0]
            at, at_class = header.index(self.kind), header.index("class")
            self.rows: list[tuple[int, str, str]] = []
            for number, cells in enumerate(rows, 2):
                if not any(c.strip() for c in cells):
                    continue
                key, cls = ((cells[i].strip() if i < len(cells) else "") for i in (at, at_class))
                if not key or not cls:
                    raise self.error(number, f"empty {self.kind if not key else 'class'}: fill it in or remove the row")
                self.rows.append((number, key, cls))
        except csv.Error as err:
            raise self.error(rows.line_num, f"not valid CSV ({err}): fix the quoting") from None

    def error(self, row: int, message: str) -> LabelError:
        return LabelError(f"{self.path}: row {row}: {message}")

    def classify(self, volumes: list[Volume]) -> list[Volume]:
        return self._by_path(volumes) if self.kind == "path" else self._by_subject(volumes)

    def _by_path(self, volumes: list[Volume]) -> list[Volume]:
        roots = sorted({v.root for v in volumes if v.root.is_dir()})
        by_file: dict[Path, tuple[int, str]] = {}
        for number, key, cls in self.rows:
            written = Path(key).expanduser()
            found = {c.resolve() for c in ([written] if written.is_absolute() else [r / written for r in roots])
                     if c.is_file()}
            if not found:
                where = "" if written.is_absolute() else \
                    f" in {', '.join(str(r) for r in roots)}" if roots else " (every SRC is a file)"
                raise self.error(number, f"no input file {key}{where}: give a path relative to a SRC folder, or "
                                         "absolute, or remove the row")
            for file in found:
                self._agree(by_file, file, number, key, cls)
        out, missing = [], []
        for volume in volumes:
            rows = [by_file[f] for f in (f.resolve() for f in volume.files) if f in by_file]
            if not rows:
                missing.append(volume)
                continue
            (first, cls), *others = rows
            for number, other in others:
                if other != cls:
                    raise self.error(number, f"{volume.display} is class {other!r} here but {cls!r} in row {first}: "
                                             "one class per series")
            out.append(replace(volume, cls=cls))
        self._no_row(missing, lambda v: v.display, "path,class")
        return out

    def _by_subject(self, volumes: list[Volume]) -> list[Volume]:
        anonymous = [v for v in volumes if not v.has_subject]
        if anonymous:
            raise LabelError(f"{self.path}: {anonymous[0].display} has no subject ({len(anonymous)} inputs have "
                             "none: no BIDS sub-XX folder, --subject-regex match or DICOM PatientID): add "
                             "--subject-regex, or label files with a path column")
        names = {v.subject_name for v in volumes}
        by_subject: dict[str, tuple[int, str]] = {}
        for number, key, cls in self.rows:
            if key not in names:
                raise self.error(number, f"unknown subject {key!r} (subjects come from BIDS sub-XX folders, "
                                         "--subject-regex or the DICOM PatientID): fix the id or remove the row")
            self._agree(by_subject, key, number, key, cls)
        self._no_row([v for v in volumes if v.subject_name not in by_subject],
                     lambda v: v.display if v.kind == "dicom" else f"subject {v.subject_name!r} ({v.display})",
                     "subject,class")
        return [replace(v, cls=by_subject[v.subject_name][1]) for v in volumes]

    def _agree(self, seen: dict[Hashable, tuple[int, str]], item: Hashable, number: int, key: str,
               cls: str) -> None:
        """Record row `number` for `item`; a second row for it must give the same class."""
        earlier = seen.setdefault(item, (number, cls))
        if earlier[1] != cls:
            raise self.error(number, f"{key} is class {cls!r} here but {earlier[1]!r} in row {earlier[0]}: "
                                     "keep one of the rows")

    def _no_row(self, missing: list[Volume], name: Callable[[Volume], str], columns: str) -> None:
        if missing:
            more = f" and {len(missing) - 1} more inputs" if len(missing) > 1 else ""
            raise LabelError(f"{self.path}: no row for {name(missing[0])}{more}: add a row ({columns}) for "
                             "each, or leave them out of the sources")
