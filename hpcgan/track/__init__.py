"""Experiment tracking (MLflow), used by global rank 0 only."""

from hpcgan.track.tracker import Tracker, resolve_uri, run_tags

__all__ = ["Tracker", "resolve_uri", "run_tags"]
