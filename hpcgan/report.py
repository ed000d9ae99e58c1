"""`hpcgan report`: a run on one page that opens anywhere, offline, without an MLflow server.

Everything is read from the run folder through `RunFolder`: curves from the metrics log, sample grids,
the `hpcgan evaluate` report and its memorization pairs, the downstream utility report, the data set's
manifest and the saved config. "Real and generated" is for judging by eye: held-out real slices beside
the newest generated grid (as many, the same classes in the same places for a conditional run), under
the classifier two-sample test's accuracy and its real floor, then the generated slices closest to
training slices beside those neighbours.
The page is one HTML file with every image embedded as a data URI, so it can be mailed, archived or
logged as an MLflow artifact; its plots are also written as PNG files beside it. A missing piece shows
as "not available" with the reason, never as an error.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

from hpcgan.config import ConfigError
from hpcgan.data import DataError, shards
from hpcgan.train.checkpoint import CheckpointError, CheckpointManager
from hpcgan.train.run_folder import RunFolder

PAGE = "report.html"
MAX_GRIDS = 8
LOSSES, D_OUTPUTS = ("loss_d", "loss_g"), ("d_real", "d_fake", "d_fake_g")
WALL_CLOCK = "time"  # Unix seconds, in records that carry it
FLOORS = (("floor/", "--", "train vs held-out"), ("floor_halves/", ":", "halves of train"))
STYLE = """body{font-family:sans-serif;margin:2em auto;max-width:1200px;color:#222}
h2{border-bottom:1px solid #ccc;margin-top:2em}img{max-width:100%}.na{color:#a33}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
pre{background:#f6f6f6;padding:1em;overflow:auto}.grids{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0;width:270px}figcaption{text-align:center}"""

Record = dict[str, Any]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder (the --out of hpcgan train)")
    parser.add_argument("--out", help=f"HTML file to write, its plots beside it (default: RUN/report/{PAGE})")


def run(args: argparse.Namespace) -> int:
    print(f"wrote {write_report(Path(args.run), Path(args.out) if args.out else None)}")
    return 0


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report of `run_dir` to `out` (default `RUN/report/report.html`) and its plots beside it;
    returns `out`. Raises ConfigError when `run_dir` is not a run folder with a metrics log."""
    run = RunFolder(run_dir)
    if not run.root.is_dir():
        raise ConfigError(f"{run.root}: no such run folder; pass the --out folder of hpcgan train as --run")
    if not run.metrics_log.is_file():
        raise ConfigError(f"{run.root}: no metrics log ({run.metrics_log.name}); pass a run folder of "
                          f"hpcgan train, or train into it first")
    try:
        records = run.read_metrics()
    except ValueError as err:
        raise ConfigError(f"{run.metrics_log}: unreadable ({err}); remove its damaged line") from None
    out = Path(out) if out is not None else run.report / PAGE
    out.parent.mkdir(parents=True, exist_ok=True)
    config = run.saved_config()
    sections = [
        ("Summary", _summary(run, records)),
        ("Losses and D outputs", _training(records, out.parent)),
        ("Quality metrics", _quality(records, out.parent)),
        ("Throughput and restarts", _throughput(records, out.parent)),
        ("Samples", _samples(run)),
        ("Real and generated", _by_eye(run, records, config)),
        ("Evaluation", _evaluation(run)),
        ("Downstream utility", _utility(run)),
        ("Data", _data(config)),
        ("Config", f"<pre>{_e(yaml.safe_dump(config, sort_keys=False))}</pre>" if config
         else _missing(f"no saved config in {run.root}")),
    ]
    body = "\n".join(f"<h2>{_e(title)}</h2>\n{content}" for title, content in sections)
    out.write_text(f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                   f"<title>hpcgan run {_e(run.root.name)}</title><style>{STYLE}</style></head>\n"
                   f"<body><h1>Run report: {_e(run.root.name)}</h1>\n{body}\n</body></html>\n")
    return out


# ---------------------------------------------------------------------------------------------- sections

def _summary(run: RunFolder, records: list[Record]) -> str:
    rows = [("run folder", str(run.root.resolve())),
            ("written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))]
    if records:
        rows.append(("last record", f"step {records[-1].get('step')}, {records[-1].get('images_seen')} images seen"))
    latest = CheckpointManager(run.checkpoints, keep=1).latest()
    try:
        state = CheckpointManager.read_state(latest) if latest is not None else None
    except CheckpointError as err:
        rows.append(("latest checkpoint", f"not available: {err}"))
        state = None
    if state is not None:
        rows.append(("latest checkpoint", f"step {state.get('step')}, {state.get('restarts', 0)} restarts "
                                          f"({latest})"))
        if best := state.get("best"):
            rows.append(("best checkpoint", f"{best.get('metric')} {_fmt(best.get('value'))} at step "
                                            f"{best.get('step')} ({run.best})"))
    tracking = run.read_tracking()
    if tracking:
        rows += [("MLflow run id", tracking.get("run_id", "")),
                 ("MLflow tracking URI", tracking.get("tracking_uri", "")),
                 ("MLflow experiment", tracking.get("experiment", ""))]
    else:
        rows.append(("MLflow", "not available: no MLflow run recorded (trained with track.enabled=false?)"))
    return _table([], rows)


def _training(records: list[Record], folder: Path) -> str:
    if not any(_number(r.get(k)) is not None for r in records for k in LOSSES + D_OUTPUTS):
        return _missing("no record in the metrics log has losses or D outputs")
    fig = Figure(figsize=(12, 4), layout="constrained")
    for ax, keys, title in zip(fig.subplots(1, 2), (LOSSES, D_OUTPUTS), ("losses", "D outputs")):
        for key in keys:
            if (series := _series(records, key))[0]:
                ax.plot(*series, label=key)
        ax.set(title=title, xlabel="images seen")
        if ax.lines:
            ax.legend()
    return _plot(fig, folder / "training.png", "losses and D outputs")


def _quality(records: list[Record], folder: Path) -> str:
    names = sorted({k for r in records for k, v in r.items() if k.startswith("eval/") and _number(v) is not None})
    if not names:
        return _missing("no eval/* records in the metrics log; in-loop metrics run every metrics.every steps "
                        "when that is at most the run's length")
    floors = {k: v for r in records for k, v in r.items()
              if k.startswith(tuple(p for p, _, _ in FLOORS)) and _number(v) is not None}
    cols = min(3, len(names))
    fig = Figure(figsize=(4.2 * cols, 3.4 * math.ceil(len(names) / cols)), layout="constrained")
    axes = list(fig.subplots(math.ceil(len(names) / cols), cols, squeeze=False).flat)
    for ax, name in zip(axes, names):
        metric = name.removeprefix("eval/")
        ax.plot(*_series(records, name), marker="o", label=metric)
        for prefix, style, label in FLOORS:
            if (floor := floors.get(prefix + metric)) is not None:
                ax.axhline(floor, color="grey", linestyle=style, label=f"{label} {floor:.4g}")
        ax.set(title=metric, xlabel="images seen")
        ax.legend(fontsize="small")
    for ax in axes[len(names):]:
        ax.set_axis_off()
    note = "" if floors else _missing("real floors: no floor/* records in the metrics log")
    return _plot(fig, folder / "quality.png", "quality metrics against images seen") + note


def _throughput(records: list[Record], folder: Path) -> str:
    rows = [r for r in records if _number(r.get("images_per_s")) is not None]
    if not rows:
        return _missing("no images_per_s in the metrics log")
    times = [_number(r.get(WALL_CLOCK)) for r in rows]
    if all(t is not None for t in times):
        start, span = min(times), max(times) - min(times)
        scale, unit = (3600.0, "h") if span > 7200 else (60.0, "min")
        key, xlabel, note = WALL_CLOCK, f"wall time ({unit})", ""
    else:
        key, xlabel, start, scale = "step", "step", 0.0, 1.0
        note = "<p>The metrics log has no wall-clock time, so throughput is plotted against step.</p>"

    def x_of(record: Record) -> float | None:
        value = _number(record.get(key))
        return None if value is None else (value - start) / scale

    fig = Figure(figsize=(12, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.plot([x_of(r) for r in rows], [r["images_per_s"] for r in rows], label="images/s")
    restarts = _restarts(records)
    for i, x in enumerate(sorted({x for r in restarts if (x := x_of(r)) is not None})):
        ax.axvline(x, color="red", linestyle="--", label="restart" if i == 0 else None)
    ax.set(title="throughput", xlabel=xlabel, ylabel="images/s")
    ax.legend()
    if not any("restarts" in r for r in records):
        note += "<p>Restarts: not recorded in the metrics log (the summary has the latest checkpoint's count).</p>"
    elif restarts:
        steps = ", ".join(str(r.get("step")) for r in restarts)
        note += f"<p>Restarts: {len(restarts)} (at step {_e(steps)}), marked in red.</p>"
    else:
        note += "<p>Restarts: none.</p>"
    return _plot(fig, folder / "throughput.png", "throughput") + note


def _samples(run: RunFolder) -> str:
    grids = every = run.sample_grid_steps()
    if not grids:
        return _missing(f"no sample grids in {run.samples}; they are written every train.sample_every steps")
    if len(every) > MAX_GRIDS:
        grids = [every[i] for i in sorted({round(k * (len(every) - 1) / (MAX_GRIDS - 1)) for k in range(MAX_GRIDS)})]
    figures = "".join(f"<figure>{_image(path.read_bytes(), f'samples at step {step}')}"
                      f"<figcaption>step {step}</figcaption></figure>" for step, path in grids)
    return (f"<p>Fixed-noise sample grids: {len(grids)} of {len(every)}, evenly spaced.</p>"
            f"<div class=\"grids\">{figures}</div>")


def _evaluation(run: RunFolder) -> str:
    path = run.evaluation_report
    if not path.is_file():
        return _missing(f"no {path.name} in {run.root}; run hpcgan evaluate --run {run.root}")
    try:
        report: Record = json.loads(path.read_text())
    except ValueError as err:
        return _missing(f"{path} is unreadable ({err}); run hpcgan evaluate again")
    rows = [(key, value, report.get(f"floor/{key}", ""), report.get(f"floor_halves/{key}", ""))
            for key, value in report.items() if not key.startswith(("floor/", "floor_halves/"))]
    table = _table(["key", "value", "floor: train vs held-out", "floor: halves of train"], rows)
    return f"<p>hpcgan evaluate, step {_e(str(report.get('step')))}.</p>{table}"


def _read_json(path: Path) -> Record | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def _by_eye(run: RunFolder, records: list[Record], config: Record | None) -> str:
    return _c2st(run, records) + _side_by_side(run, config) + _closest_pairs(run)


def _c2st(run: RunFolder, records: list[Record]) -> str:
    """The C2ST accuracy with its floor: `hpcgan evaluate`'s when it ran the test, else the newest in-loop one."""
    report = _read_json(run.evaluation_report) or {}
    if _number(report.get("c2st")) is not None:
        value, floor, where = report["c2st"], report.get("floor/c2st"), f"hpcgan evaluate, step {report.get('step')}"
    else:
        logged = [r for r in records if _number(r.get("eval/c2st")) is not None]
        floors = [r["floor/c2st"] for r in records if _number(r.get("floor/c2st")) is not None]
        if not logged:
            return _missing("classifier two-sample test: neither metrics.json nor the metrics log has c2st "
                            "(hpcgan evaluate --metrics ...,c2st, or metrics.names with c2st)")
        value, floor, where = logged[-1]["eval/c2st"], floors[-1] if floors else None, f"in-loop, step {logged[-1]['step']}"
    beside = f" (real floor, training vs held-out slices: {floor:.3f})" if _number(floor) is not None else ""
    return (f"<p class=\"c2st\"><b>Classifier two-sample test: {value:.3f}</b>{_e(beside)}, {_e(where)}. A small CNN "
            "trained to tell real from generated slices, scored on slices it has not seen: 0.5 = it cannot tell "
            "them apart, 1.0 = it always can.</p>")


def _side_by_side(run: RunFolder, config: Record | None) -> str:
    grids = run.sample_grid_steps()
    if not grids:
        return _missing(f"no sample grids in {run.samples} to compare with real slices")
    step, path = grids[-1]
    png = path.read_bytes()
    try:
        real = _image(_real_grid(config or {}, png), "real held-out slices")
    except (DataError, ConfigError, OSError, ValueError) as err:
        real = _missing(f"real held-out slices: {err}")
    return ("<div class=\"grids\">"
            f"<figure class=\"eye\">{real}<figcaption>real held-out slices</figcaption></figure>"
            f"<figure class=\"eye\">{_image(png, f'generated slices at step {step}')}"
            f"<figcaption>generated, newest (step {step})</figcaption></figure></div>")


def _real_grid(config: Record, generated_png: bytes) -> bytes:
    """Held-out real slices as a PNG grid like `generated_png` (as many tiles, the same layout); for a
    conditional run each tile of the class the generated grid shows there."""
    import torch
    from PIL import Image

    from hpcgan.data import load_labelled, load_real
    from hpcgan.train.samples import grid_columns, grid_labels, save_grid

    data, model = config.get("data") or {}, config.get("model") or {}
    path, size = str(data.get("path") or ""), int(model.get("resolution") or 64)
    if not path or not Path(path).exists():
        raise ConfigError(f"the run's data ({path or 'no data.path'}) is not on this machine")
    width, height = Image.open(io.BytesIO(generated_png)).size
    cols, rows = (width - 2) // (size + 2), (height - 2) // (size + 2)
    tiles = cols * rows if cols * rows and grid_columns(cols * rows) == cols else 64
    order = torch.Generator().manual_seed(0)
    if model.get("conditional") and shards.is_shard_dir(Path(path)):
        images, labels, classes = load_labelled(path, "val", size)
        wanted = grid_labels(tiles, len(classes))
        pools = {c: (labels == c).nonzero()[:, 0] for c in range(len(classes))}
        if any(len(pools[int(c)]) == 0 for c in wanted.unique()):
            raise ValueError(f"{path}: the val split lacks a class the generated grid shows")
        chosen = images[torch.cat([pools[int(c)][torch.randint(len(pools[int(c)]), (1,), generator=order)]
                                   for c in wanted])]
    else:
        images = load_real(path, "val", size)
        if not len(images):
            raise ValueError(f"{path}: no held-out slices")
        shuffled = torch.randperm(len(images), generator=order)
        chosen = images[shuffled.repeat(-(-tiles // len(images)))[:tiles]]  # repeats only when fewer than tiles
    with tempfile.TemporaryDirectory() as tmp:
        return save_grid(chosen.float() / 127.5 - 1, Path(tmp) / "real.png").read_bytes()


def _closest_pairs(run: RunFolder) -> str:
    report = _read_json(run.evaluation_report) or {}
    pairs = report.get("memorization_pairs_png")
    pairs_png = run.evaluation / Path(pairs).name if pairs else None
    if pairs_png is None or not pairs_png.is_file():
        return _missing("memorization pairs: the evaluation has no memorization audit picture "
                        "(hpcgan evaluate --metrics ...,memorization)")
    return (f"<h3>Memorization audit: closest pairs</h3><p>The generated slices closest to a training slice, "
            f"closest first; each pair is a generated slice (left) and its nearest training slice (right). "
            f"Flagged share {_e(_fmt(report.get('memorization', '')))}, threshold calibrated by "
            f"{_e(str(report.get('memorization_calibration', '?')))}.</p>"
            + _image(pairs_png.read_bytes(), "closest generated and training pairs"))


def _utility(run: RunFolder) -> str:
    path = run.utility_report
    if not path.is_file():
        return _missing(f"no {path.name} in {run.root}; run hpcgan evaluate --utility --run {run.root} "
                        "(a conditional run on labelled shards)")
    report = _read_json(path)
    if report is None or not isinstance(report.get("arms"), dict):
        return _missing(f"{path} is unreadable; run hpcgan evaluate --utility again")
    scores = list(next(iter(report["arms"].values()), {}))
    rows = [(arm, *(f"{s[name]['mean']:.3f} ± {s[name]['std']:.3f}" for name in scores))
            for arm, s in report["arms"].items()]
    generated = [(c, f"{s['mean']:.3f} ± {s['std']:.3f}") for c, s in (report.get("generated_class_accuracy") or {}).items()]
    plot = _image(run.utility_plot.read_bytes(), "downstream utility per arm") if run.utility_plot.is_file() \
        else _missing(f"no {run.utility_plot.name} beside {path.name}")
    verdict = f"<p><strong>{_e(report['best_use'])}</strong></p>" if report.get("best_use") else ""
    return (verdict + f"<p>A fixed classifier per arm, tested on held-out real slices; step {_e(str(report.get('step')))}, "
            f"{len(report.get('seeds', []))} seeds, mean ± std.</p>"
            + _table(["arm", *(n.replace('_', ' ') for n in scores)], rows) + plot
            + ("<p>The real-trained classifier on generated slices, accuracy per requested class:</p>"
               + _table(["class", "accuracy"], generated) if generated else ""))


def _data(config: Record | None) -> str:
    path = str(((config or {}).get("data") or {}).get("path") or "")
    if not path:
        return _missing("the run has no saved config with data.path")
    head = f"<p>data.path: <code>{_e(path)}</code></p>"
    if not shards.is_shard_dir(Path(path)):
        kind = "an image folder" if Path(path).is_dir() else "a file" if Path(path).exists() \
            else "not found on this machine"
        return head + _missing(f"shard manifest: {path} is {kind}, not a shard folder of hpcgan prepare")
    try:
        manifest = shards.read_manifest(Path(path))
    except DataError as err:
        return head + _missing(str(err))
    split = manifest.get("split")
    method = {k: v for k, v in split.items() if not isinstance(v, (list, dict))} if isinstance(split, dict) \
        else split or "not recorded"
    rows = [(name, count, *((manifest.get(field) or {}).get(name, "") for field in
                            ("subjects", "volumes", "contrasts", "kinds")))
            for name, count in (manifest.get("counts") or {}).items()]
    return (head + f"<p>Sizes {_e(_fmt(manifest.get('sizes')))}; split: {_e(_fmt(method))}.</p>"
            + _table(["split", "images", "subjects", "volumes", "contrasts", "kinds"], rows))


# ---------------------------------------------------------------------------------------------- helpers

def _number(value: Any) -> float | None:
    """`value` as a finite float, None for anything else (strings, bools, NaN)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _series(records: list[Record], key: str) -> tuple[list[float], list[float]]:
    pairs = [(x, y) for r in records
             if (x := _number(r.get("images_seen"))) is not None and (y := _number(r.get(key))) is not None]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _restarts(records: list[Record]) -> list[Record]:
    """The records where the `restarts` count goes up."""
    found, before = [], 0.0
    for record in records:
        if (count := _number(record.get("restarts"))) is not None:
            if count > before:
                found.append(record)
            before = count
    return found


def _plot(fig: Figure, path: Path, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    path.write_bytes(buffer.getvalue())
    return _image(buffer.getvalue(), alt)


def _image(png: bytes, alt: str) -> str:
    return f"<img alt=\"{_e(alt)}\" src=\"data:image/png;base64,{base64.b64encode(png).decode()}\">"


def _missing(why: str) -> str:
    return f"<p class=\"na\">not available: {_e(why)}</p>"


def _fmt(value: Any) -> str:
    """Plain text of a value: floats to 6 significant digits, dicts as `key value, ...`."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def _table(head: list[str], rows: list[tuple[Any, ...]]) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{_e(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    header = f"<tr>{''.join(f'<th>{_e(h)}</th>' for h in head)}</tr>" if head else ""
    return f"<table>{header}{cells}</table>"


def _e(text: str) -> str:
    return html.escape(text, quote=True)
