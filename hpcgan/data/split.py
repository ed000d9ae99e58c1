"""Train/val splits that keep near-duplicates apart: by subject, or by slabs of slices.

Neighbouring MRI slices are near-identical, so a random split of slices leaks: val would hold the
neighbours of training slices. The subject split keeps whole subjects apart. Collections of few
subjects (a template, a handful of scans) use the slab split instead: per slicing axis, contiguous
blocks of slices go to val, each flanked by `gap` slices that go to neither split.
"""

from __future__ import annotations

import hashlib


def assign_splits(subjects: set[str], val_frac: float, seed: int,
                  strata: dict[str, str] | None = None) -> dict[str, str]:
    """subject key -> "train" | "val".

    Subjects are ranked by a seeded hash of their key, and the first round(val_frac * n) go to val (at
    least one when val_frac > 0 and there are two or more subjects; never all of them). Ranking by hash
    rather than shuffling a list means adding subjects later moves few existing ones across the split.

    `strata` (subject -> class) stratifies: each class's subjects are split on their own, so every class
    with two or more subjects lands in both splits; subjects without a class form one stratum. When the
    strata leave val empty, the first-ranked subject of the largest stratum goes there, so val is never
    empty for want of large classes.
    """
    if not 0.0 <= val_frac < 1.0:
        raise ValueError(f"val_frac={val_frac}: must be in [0, 1)")
    groups: dict[str | None, list[str]] = {}
    for s in subjects:
        groups.setdefault((strata or {}).get(s), []).append(s)
    ranked = {c: sorted(g, key=lambda s: hashlib.sha256(f"{seed}\0{s}".encode()).hexdigest())
              for c, g in groups.items()}
    out: dict[str, str] = {}
    for members in ranked.values():
        n_val = _val_count(len(members), val_frac)
        out |= {s: "val" if i < n_val else "train" for i, s in enumerate(members)}
    if val_frac > 0 and len(subjects) >= 2 and "val" not in out.values():
        largest = max(ranked.values(), key=lambda m: (len(m), m[0]))
        out[largest[0]] = "val"
    return out


def _val_count(n: int, val_frac: float) -> int:
    """round(val_frac * n), at least one when val_frac > 0 and n >= 2, never all n."""
    if val_frac > 0 and n >= 2:
        return min(max(round(val_frac * n), 1), n - 1)
    return 0


def val_slabs(first: int, last: int, val_frac: float, count: int, gap: int, key: str) -> list[range]:
    """The val slabs among slice indices first..last, in order; empty when none fits.

    round(val_frac * n) slices (at least one when val_frac > 0) go to val in `count` slabs of near-equal
    width, one per equal stretch of the extent, so val spans the anatomy that train does. Each slab lies
    at a random offset within its stretch (seeded by `key`) with `gap` slices on either side and at least
    one training slice left in the stretch; when that does not fit, fewer slabs are used, and none when
    even one does not fit.
    """
    n = last - first + 1
    if val_frac <= 0 or n < 1:
        return []
    n_val = max(1, round(val_frac * n))
    for k in range(min(count, n_val), 0, -1):
        bounds = [first + i * n // k for i in range(k + 1)]
        widths = [n_val // k + (i < n_val % k) for i in range(k)]
        rooms = [bounds[i + 1] - bounds[i] - widths[i] - 2 * gap for i in range(k)]
        if min(rooms) >= 1:
            starts = [bounds[i] + gap + _draw(f"{key}\0{i}", rooms[i] + 1) for i in range(k)]
            return [range(s, s + w) for s, w in zip(starts, widths, strict=True)]
    return []


def _draw(key: str, n: int) -> int:
    """A seeded pick from range(n) that depends on nothing but `key` (not on a library's RNG stream)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % n


def slab_role(index: int, slabs: list[range], gap: int) -> str:
    """"val" inside a slab, "gap" within `gap` slices of one, else "train"."""
    if any(index in s for s in slabs):
        return "val"
    if any(s.start - gap <= index < s.stop + gap for s in slabs):
        return "gap"
    return "train"
