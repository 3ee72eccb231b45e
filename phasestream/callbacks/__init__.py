"""Bluesky callbacks: live phase mapping into Tiled."""

from phasestream.callbacks.analysis import RunAnalysis, RunResult
from phasestream.callbacks.phase_map import PhaseMapCallback

__all__ = ["PhaseMapCallback", "RunAnalysis", "RunResult"]
