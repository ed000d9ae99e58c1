"""torch.compile together with lazy R1: the penalty's double backward runs D eagerly, other steps compiled."""

from __future__ import annotations

import pytest
import torch

from helpers import final_weights, make_trainer

R1 = ["train.r1_gamma=1.0", "train.r1_every=2", "train.steps=2", "metrics.every=0"]


def test_r1_steps_of_a_compiled_d_run_eagerly(image_folder, tmp_path):
    """D compiled with AOTAutograd (what every torch.compile backend but `eager` builds on, and which has no
    double backward): step 0 takes R1 through the plain D, step 1 the compiled one."""
    trainer = make_trainer(image_folder, tmp_path / "run", *R1)
    compiled = trainer.D = torch.compile(trainer.D, backend="aot_eager")
    assert trainer.fit() == 0
    assert trainer.D is compiled and all(v.isfinite().all() for v in final_weights(tmp_path / "run").values())


@pytest.mark.slow
def test_train_compile_with_r1_trains(image_folder, tmp_path):
    """`train.compile=true` (inductor, as on a GPU node) with lazy R1: an R1 step, then a compiled one."""
    trainer = make_trainer(image_folder, tmp_path / "run", *R1, "train.compile=true")
    assert trainer.fit() == 0
    assert trainer.state.step == 2
