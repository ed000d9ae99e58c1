"""The GPU report writer, checked on CPU (it must work where the checks are skipped, too)."""

from __future__ import annotations

import json

from gpu_report import Report


def test_report_holds_outcomes_and_figures_and_no_nan(tmp_path):
    report = Report()
    report.figures("t::a")["images_per_s"] = 1234.5
    report.figures("t::a")["loss"] = float("nan")
    report.outcome("t::a", "passed")
    report.outcome("t::b", "failed", "AssertionError: weights differ")
    report.outcome("t::b", "passed")  # a later phase does not hide a failure
    doc = json.loads(report.write(tmp_path / "out" / "gpu.json").read_text())
    assert doc["tests"]["t::a"] == {"outcome": "passed", "figures": {"images_per_s": 1234.5, "loss": "nan"}}
    assert doc["tests"]["t::b"]["outcome"] == "failed" and "weights differ" in doc["tests"]["t::b"]["detail"]
    assert doc["counts"] == {"passed": 1, "failed": 1}
    assert not list((tmp_path / "out").glob("*.tmp"))
