"""Run by tests/test_ddp.py under torch.distributed.run: trains a few DDP steps and checks, after every
step, that all ranks hold bit-identical G and D parameters (gathered over gloo)."""

import json
import sys

import torch
import torch.distributed as dist

from hpcgan.config import build_config
from hpcgan.train import Trainer
from hpcgan.train.loop import release_distributed

out, steps, *overrides = sys.argv[1:]
trainer = Trainer(build_config(overrides=overrides), out)
assert trainer.world == 2 and dist.get_backend() == "gloo"
assert not trainer.D.broadcast_buffers  # the BatchNorm/DDP trap, handled on purpose
report = []
for _ in range(int(steps)):
    stats = trainer.step()
    assert torch.isfinite(stats).all()
    for name, net in (("G", trainer.G), ("D", trainer.D)):
        flat = torch.cat([p.detach().flatten() for p in net.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(trainer.world)]
        dist.all_gather(gathered, flat)
        report.append({"step": trainer.state.step, "net": name, "equal": bool(torch.equal(gathered[0], gathered[1])),
                       "norm": float(flat.norm())})
if trainer.rank == 0:
    with open(f"{out}/ddp_report.json", "w") as handle:
        json.dump(report, handle)
release_distributed()
