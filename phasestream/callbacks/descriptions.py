"""How a run's streams describe the image key, checked against each other.

The raw run's writer (TiledWriter) keeps one description per data key *name* across a run's streams: the
last descriptor's. A ``flat`` or ``dark`` stream whose image key has another dtype or shape than the
``primary``'s is therefore stored in Tiled in the other's (a float flat beside 16-bit images, truncated to
16-bit). The analysis uses the frames as they were sent, so its maps are right; a reprocess from Tiled
reads the stored frames and may differ. :class:`ImageDescriptions` finds such a run so that its result
says so (docs/contract.md, "Start document", the streams).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ImageDescriptions"]


class ImageDescriptions:
    """The (dtype, shape) each stream's descriptor gives the run's image key."""

    def __init__(self, image_key: str):
        self.image_key = image_key
        self.by_stream: dict[str, tuple[str, str]] = {}
        self.noted = False  # one note per run: the first disagreement

    def conflict(self, stream: str, data_keys: Any) -> str | None:
        """The note to record when ``stream``'s descriptor (its ``data_keys``) describes the image key otherwise
        than an earlier stream did, the first time one does; None otherwise. Values from the network are shown
        truncated."""
        described = data_keys.get(self.image_key) if isinstance(data_keys, dict) else None
        if not isinstance(described, dict):
            return None
        mine = (str(described.get("dtype_numpy"))[:20], str(described.get("shape"))[:40])
        self.by_stream.setdefault(stream, mine)
        for other, theirs in self.by_stream.items():
            if other != stream and theirs != mine and not self.noted:
                self.noted = True
                return (f"stream {stream!r:.40} describes {self.image_key!r:.80} as {mine[0]} {mine[1]} and stream "
                        f"{other!r:.40} as {theirs[0]} {theirs[1]}: the raw run in Tiled keeps one description per "
                        "data key (TiledWriter), so it holds one stream's frames in the other's dtype and shape; this "
                        "analysis used the frames as sent, a reprocess from Tiled may differ (docs/contract.md)")
        return None
