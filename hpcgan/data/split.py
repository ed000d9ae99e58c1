"""Assign subjects to train/val: whole subjects only, deterministic for a seed, stable as data grows."""

from __future__ import annotations

import hashlib


def assign_splits(subjects: set[str], val_frac: float, seed: int) -> dict[str, str]:
    """subject key -> "train" | "val".

    Subjects are ranked by a seeded hash of their key, and the first round(val_frac * n) go to val (at
    least one when val_frac > 0 and there are two or more subjects; never all of them). Ranking by hash
    rather than shuffling a list means adding subjects later moves few existing ones across the split.
    """
    if not 0.0 <= val_frac < 1.0:
        raise ValueError(f"val_frac={val_frac}: must be in [0, 1)")
    ranked = sorted(subjects, key=lambda s: hashlib.sha256(f"{seed}\0{s}".encode()).hexdigest())
    n_val = round(val_frac * len(ranked))
    if val_frac > 0 and len(ranked) >= 2:
        n_val = min(max(n_val, 1), len(ranked) - 1)
    else:
        n_val = 0
    return {s: "val" if i < n_val else "train" for i, s in enumerate(ranked)}
