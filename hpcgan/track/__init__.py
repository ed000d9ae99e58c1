"""Experiment tracking (MLflow), used by global rank 0 only."""

from hpcgan.track.tracker import Tracker, run_tags

__all__ = ["Tracker", "run_tags"]
