"""The in-memory outcome of one analysed run."""

from __future__ import annotations

import threading

import numpy as np

from phasestream.contract import RunSettings

__all__ = ["RunResult"]


class RunResult:
    """The in-memory outcome of one analysed run (what was written to Tiled, for callers and tests).

    ``key`` is the result's key in Tiled: the run uid, or ``<run uid>.f<index>`` for one field of a run
    imaged at several positions, whose ``field`` is ``{index, count, positions}`` (docs/contract.md).
    """

    def __init__(self, settings: RunSettings):
        self.settings = settings
        self.key = settings.run_uid
        self.field: dict | None = None
        self.status = "running"
        self.errors: list[str] = []
        self.energies: list[float] = []
        self.metadata: dict = {}
        self.arrays: dict[str, np.ndarray] = {}
        self.done = threading.Event()
        #: a write of the final result failed or did not read back: Tiled does not hold it whole
        self.write_failed = False

    @property
    def uid(self) -> str:
        return self.settings.run_uid
