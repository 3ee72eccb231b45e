"""Bluesky callbacks: live phase mapping into Tiled."""

from phasestream.callbacks.analysis import RunAnalysis
from phasestream.callbacks.phase_map import PhaseMapCallback
from phasestream.callbacks.result import RunResult

__all__ = ["PhaseMapCallback", "RunAnalysis", "RunResult"]
