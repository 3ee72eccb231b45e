"""How the live analysis of each run is configured (plain values)."""

from __future__ import annotations

from dataclasses import dataclass, field

from phasestream.callbacks.assets import AssetFolders
from phasestream.contract import DocumentBounds

__all__ = ["AnalysisConfig"]


@dataclass(frozen=True)
class AnalysisConfig:
    """How each run is analysed: the callback's options as plain values (``PhaseMapCallback.analysis_config``).

    ``update_every`` / ``update_seconds``: partial maps after this many images or seconds, at most
    one per ``min_update_seconds`` and costing at most ``partial_budget`` of the time (None: no
    limit); ``writes_tiled``: results go to Tiled (else they are kept in memory only).
    """

    backend: str
    ambiguity: float
    mask_threshold: float | None = None
    update_every: int = 4
    update_seconds: float = 2.0
    min_update_seconds: float = 0.5
    partial_budget: float | None = 0.125
    write_od: bool = True
    keep_arrays: bool = True
    writes_tiled: bool = False
    bounds: DocumentBounds = field(default_factory=DocumentBounds)
    assets: AssetFolders = field(default_factory=AssetFolders)  # where external images may be read
