"""What the view shows of one result: its checked metadata, the curve of its fractions against energies seen,
and the JSON the page gets (:func:`summarize`), kept by :class:`~phasestream.app.view.follow.CatalogFollower`.

The curve is bounded: at most :data:`HISTORY_LIMIT` points and :data:`HISTORY_NUMBERS` fractions in all
(points x phases); when full it is thinned to every other point, the newest kept, so a long run's curve
still starts at its first energies, coarser.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

from phasestream.contract import Status
from phasestream.contract.metadata import image_shape_of, shown_metadata
from phasestream.store.tiled import public_uri

__all__ = ["HISTORY_LIMIT", "HISTORY_NUMBERS", "RunSummary", "summarize"]

HISTORY_LIMIT = 2000  # points of a run's fractions-against-energies curve the page gets
HISTORY_NUMBERS = 10_000  # fractions in all (points x phases): a run of many phases gets fewer, coarser points


@dataclass
class RunSummary:
    """What the view shows of one result, from its metadata (plus what the view saw live)."""

    uid: str
    metadata: dict
    version: int = 0  # bumped whenever the maps may have changed (the images' cache key)
    od_planes: int = 0  # planes of ``od`` seen written through the array subscription
    od_version: int = 0
    expected: int | None = None  # the raw run's ``num_points``, when known
    history: list = field(default_factory=list)  # [[n_energies_seen, [fraction of each phase]], ...]
    received_at: float = 0.0  # when the last update reached the view (seconds since the epoch)
    streamed_at: datetime | None = None  # Tiled's timestamp of the last metadata update streamed (None: read)

    def __post_init__(self) -> None:
        self.metadata = shown_metadata(self.metadata)  # every field the view shows checked (contract/metadata.py)

    def absorb(self, metadata: dict) -> bool:
        """Take new metadata; True when the maps (or the status) may have changed, not a mere heartbeat."""
        old, first = self.metadata, self.version == 0  # every first absorb bumps the version
        self.metadata = metadata = shown_metadata(metadata)
        changed = first or any(old.get(k) != metadata.get(k) for k in
                               ("n_energies_seen", "status", "phase_fractions", "refined_fractions", "refinement",
                                "errors", "particle_pixels"))
        if changed:
            self.version += 1
        fr, n = metadata.get("phase_fractions") or {}, metadata.get("n_energies_seen") or 0
        point = [n, [fr.get(p) for p in metadata["references"]["phases"] or fr]]  # in the order of the phases
        if fr and n and (not self.history or self.history[-1] != point):
            history = sorted([*(h for h in self.history if h[0] != n), point], key=lambda h: h[0])
            limit = max(2, min(HISTORY_LIMIT, HISTORY_NUMBERS // len(fr)))
            while len(history) > limit:  # every other point, the newest kept: the curve from its start, coarser
                history = [*history[:-1:2], history[-1]]
            self.history = history
        return changed

    def as_dict(self, *, tiled_base: str, root: str) -> dict:
        return summarize(self, tiled_base=tiled_base, root=root)


def summarize(run: RunSummary, *, tiled_base: str, root: str) -> dict:
    """The JSON the page gets for one run (no secrets: links carry no API key)."""
    md = run.metadata
    seen = max(md["n_energies_seen"], run.od_planes if md["status"] == Status.RUNNING else 0)
    path = f"{root}/{run.uid}"
    base = public_uri(tiled_base).rstrip("/")
    arrays = ("phase", "reliability", "ambiguous", "pcc", "mask", "od", "refined_phase")
    return {
        "uid": run.uid,
        "scan_id": md["scan_id"],
        "sample": md["sample"].get("name"),
        "state_of_charge": md["state_of_charge"],
        "status": md["status"],
        "energies_seen": seen,
        "maps_energies": md["n_energies_seen"],  # the energies behind the latest maps
        "energies_expected": run.expected,
        "phases": md["references"]["phases"],
        "image_shape": None if (shape := image_shape_of(md)) is None else list(shape),  # pixels the page asks for
        "phase_fractions": md["phase_fractions"],
        "ambiguous_fraction": md["ambiguous_fraction"],
        "mean_reliability": md["mean_reliability"],
        "refined_fractions": md["refined_fractions"],
        "refinement": md["refinement"],
        "errors": md["errors"],
        "updated_at": md["updated_at"],
        "summarized_at": time.time(),  # the page ages a silent running result on this clock (view.js)
        "received_at": run.received_at,
        "version": run.version,
        "od_version": run.od_version,
        "history": run.history,
        "links": {name: f"{base}/array/full/{path}/{name}" for name in arrays}
        | {"metadata": f"{base}/metadata/{path}"},
    }
