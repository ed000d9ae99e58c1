"""GPU checks (marker `gpu`): skipped without CUDA. Each test may record figures; with HPCGAN_GPU_REPORT set
(tests/gpu/run.sh sets it) the session ends by writing every test's outcome and figures to that JSON file."""

from __future__ import annotations

import os

import pytest
import torch

from gpu_report import Report

REPORT = Report()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="no CUDA device: GPU checks run with `bash tests/gpu/run.sh` on a GPU machine")
    for item in items:
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        REPORT.outcome(report.nodeid, report.outcome, str(report.longrepr)[-2000:] if report.failed else "")


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("HPCGAN_GPU_REPORT")
    if path:
        REPORT.write(path)


@pytest.fixture
def figures(request) -> dict:
    """This test's figures (numbers) for the report."""
    return REPORT.figures(request.node.nodeid)
