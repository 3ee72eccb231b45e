"""PNG images of a result for the view, rendered on the server (Pillow; no pyplot).

Arrays in, PNG bytes out. The phase map uses the paper's display (``figures.phase_rgb``: phase colour,
reliability as brightness, ambiguous grey, black background); PCC maps use a fixed colour scale
from -1 to 1 so that maps of different phases and moments compare; the OD image is scaled between
its 1st and 99th percentiles.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from PIL import Image

from phasestream.app.figures import PHASE_COLORS, phase_rgb

__all__ = ["od_png", "pcc_png", "phase_colors_hex", "phase_png", "png"]

_PCC_COLORMAP = colormaps["RdBu_r"]
_OD_COLORMAP = colormaps["gray"]


def png(rgb: np.ndarray) -> bytes:
    """(Y, X, 3) floats in [0, 1] (or uint8) as PNG bytes."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        rgb = (np.clip(np.nan_to_num(rgb, nan=0.0), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def phase_png(phase: np.ndarray, reliability: np.ndarray, ambiguous: np.ndarray | None = None) -> bytes:
    """The phase map: (Y, X) phase index (-1 background), reliability and ambiguous flags."""
    return png(phase_rgb(phase, reliability, ambiguous))


def pcc_png(pcc_map: np.ndarray) -> bytes:
    """One (Y, X) PCC map on a blue-white-red scale from -1 to 1; NaN (masked) black."""
    values = np.asarray(pcc_map, dtype=np.float32)
    rgb = _PCC_COLORMAP((np.nan_to_num(values, nan=0.0) + 1.0) / 2.0)[..., :3]
    rgb[~np.isfinite(values)] = 0.0
    return png(rgb)


def od_png(od_plane: np.ndarray) -> bytes:
    """One (Y, X) OD plane in grey, scaled between its 1st and 99th percentiles; NaN (masked) black."""
    values = np.asarray(od_plane, dtype=np.float32)
    finite = values[np.isfinite(values)]
    low, high = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    span = float(high - low) or 1.0
    rgb = _OD_COLORMAP(np.clip((np.nan_to_num(values, nan=low) - low) / span, 0.0, 1.0))[..., :3]
    rgb[~np.isfinite(values)] = 0.0
    return png(rgb)


def phase_colors_hex() -> list[str]:
    """The phase colours of the phase map, as CSS ``#rrggbb`` (the page's legend and fraction bars)."""
    return ["#" + "".join(f"{round(float(255 * c)):02x}" for c in color) for color in PHASE_COLORS]
