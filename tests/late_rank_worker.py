"""Run under torch.distributed.run by tests/test_ddp.py: the real `hpcgan train` CLI, except that rank 1
stalls for SLEEP seconds before its cross-rank check after step 2 (a stalled rank that still ends on the
SIGTERM torchrun sends once another rank has failed).

`late_rank_worker.py SLEEP TRAIN_ARGS...`
"""

from __future__ import annotations

import os
import sys
import time

from hpcgan.cli import main
from hpcgan.train import Trainer

if __name__ == "__main__":
    sleep = float(sys.argv[1])
    if int(os.environ["RANK"]) == 1:
        check = Trainer._should_stop

        def stalled(self: Trainer) -> bool:
            end = time.monotonic() + sleep
            while self.state.step == 2 and not self.interrupt and time.monotonic() < end:
                time.sleep(0.1)
            return check(self)

        Trainer._should_stop = stalled
    sys.exit(main(sys.argv[2:]))
