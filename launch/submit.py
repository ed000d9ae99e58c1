#!/usr/bin/env python
"""Submit hpcgan training to SLURM (or run it locally through the same submitit path).

    python launch/submit.py [--cluster slurm|local] [--nodes N] [--gpus-per-node G] ... -- --data DIR --out RUN

The logic lives in hpcgan/launch/submit.py so that it is importable and tested.
"""

from hpcgan.launch.submit import main

if __name__ == "__main__":
    raise SystemExit(main())
