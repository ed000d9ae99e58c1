"""`hpcgan features --data SHARDS`: train (or find) the offline feature space of a shard folder.

FD, KID, precision/recall and density/coverage need a feature network; without an Inception file they
use this small self-supervised encoder trained on the data set's own training slices, cached by its
fingerprint, so `hpcgan evaluate` and in-loop metrics pick it up with no download.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="shard folder made by hpcgan prepare")
    parser.add_argument("--size", type=int, default=None, help="resolution (default: the shards' first size)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 600, minutes on a CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="encoder file (default: the cache, ~/.cache/hpcgan/features)")
    parser.add_argument("--validate", action="store_true",
                        help="print how FD/KID respond to known degradations of held-out slices")


def run(args: argparse.Namespace) -> int:
    import hpcgan.metrics as M
    from hpcgan.data import load_split
    from hpcgan.data.pixels import to_unit

    path = M.train_features(args.data, out=args.out, seed=args.seed, steps=args.steps, resolution=args.size,
                            progress=print)
    print(f"feature space: {path}")
    if args.validate:
        extractor = M.SSLFeatures(path)
        held_out = load_split(args.data, "val", extractor.resolution)
        print(M.markdown_table(M.disturbance_curves(extractor, to_unit(held_out))))
    return 0
