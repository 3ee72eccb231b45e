"""A TXM run's dark and flat-field frames, kept as the OD ``-ln((I - dark) / (flat - dark))`` needs them.

The darks are kept as a running sum (their mean is the dark that corrects every image), so a run's
memory holds one dark frame however many arrive (before: every dark frame as float64, 3.4 GB for
400 frames of 1 MiB, and the mean recomputed over all of them for every image). The flats are kept
one per event, at most ``max_flats`` of them (the worker's ``--max-num-points``: one per energy).
"""

from __future__ import annotations

import numpy as np

__all__ = ["TXMCorrections"]


class TXMCorrections:
    """Dark and flat-field frames of one run (shared by the fields of a run imaged at several positions)."""

    def __init__(self, *, max_flats: int):
        self.max_flats = int(max_flats)
        self.flats: list[tuple[float, np.ndarray]] = []
        self.n_darks = 0
        self._dark_sum: np.ndarray | None = None
        self._dark: np.ndarray | None = None  # the mean, until the next dark frame

    def add_dark(self, image: np.ndarray) -> None:
        """Add one dark frame; a frame of another shape than the first is a ValueError."""
        if self._dark_sum is not None and image.shape != self._dark_sum.shape:
            raise ValueError(f"dark frame of shape {image.shape}, the run's earlier ones {self._dark_sum.shape}")
        if self._dark_sum is None:
            self._dark_sum = np.zeros(image.shape, np.float64)
        self._dark_sum += image
        self.n_darks += 1
        self._dark = None

    def add_flat(self, energy: float, image: np.ndarray) -> None:
        """Add the flat-field frame taken at ``energy`` (eV); beyond ``max_flats`` a ValueError."""
        if len(self.flats) >= self.max_flats:
            raise ValueError(f"more than {self.max_flats} flat-field images in the run (--max-num-points); ignored")
        self.flats.append((energy, image))

    def dark(self) -> np.ndarray | float:
        """The mean of the dark frames (Y, X), or 0.0 without any."""
        if self._dark_sum is None:
            return 0.0
        if self._dark is None:
            self._dark = self._dark_sum / self.n_darks
        return self._dark

    def flat(self, energy: float) -> np.ndarray:
        """The flat-field frame nearest in energy (the first of equally near ones); ValueError without any."""
        if not self.flats:
            raise ValueError("TXM image before any flat-field image (stream 'flat')")
        return min(self.flats, key=lambda f: abs(f[0] - energy))[1]
