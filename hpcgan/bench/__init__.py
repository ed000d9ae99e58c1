"""`hpcgan bench`: hpcgan's training speed against the canonical PyTorch DCGAN loop, on the same images.

Modules: `run` (the command; light imports), `suite` (the stages in order), `reference` (the loop users
know, re-implemented), `images` (one image set in both loops' forms), `throughput` (interleaved A/B
timing), `worker` (one loop per process), `flops` (FLOP counts, matmul limit, peaks), `readers`,
`checkpointing` (save/restore, signal to exit), `scaling` (gloo weak scaling, multi-node projection) and
`report` (targets, table).
"""
