"""Shared fixtures; the plain helpers they use live in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import sinfo_unreachable, write_image_folder


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data") / "slices")


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """The local SLURM (slurm/local/start.sh). Skipped where it is not running, except in CI, where
    tests/run.sh starts it and a missing cluster is a failure, not a silent skip."""
    why = sinfo_unreachable()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
