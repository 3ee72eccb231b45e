"""PNG figures of a phase-mapping result: phase map with reliability as brightness, PCC maps, fractions.

The phase map follows the display of the PCC-GMVAE paper (docs/methods.md; doi:10.48550/arXiv.2603.07666,
section 3.3): each pixel is coloured by its phase, with the reliability (best minus second-best
PCC) as brightness; background is black and ambiguous pixels are grey.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["MAX_LABEL_CHARS", "PHASE_COLORS", "label_text", "phase_rgb", "save_result_figures", "show_literally"]

PHASE_COLORS = np.array(
    [
        [0.12, 0.47, 0.71],  # blue
        [1.00, 0.50, 0.05],  # orange
        [0.17, 0.63, 0.17],  # green
        [0.84, 0.15, 0.16],  # red
        [0.58, 0.40, 0.74],  # purple
        [0.55, 0.34, 0.29],
        [0.89, 0.47, 0.76],
        [0.74, 0.74, 0.13],
    ]
)
AMBIGUOUS_GREY = np.array([0.6, 0.6, 0.6])
#: the most characters of a name (sample, phase) shown in a figure
MAX_LABEL_CHARS = 80
#: text drawn as the characters it holds: a name with ``$`` is no mathtext, no text goes through TeX
LITERAL_TEXT = {"text.parse_math": False, "text.usetex": False}


def label_text(value: object, limit: int = MAX_LABEL_CHARS) -> str:
    """``value`` (a sample or phase name: any text a document or a result gives) as a figure label: unprintable
    characters as spaces, at most ``limit`` characters, the last an ellipsis when it was longer."""
    text = "".join(c if c.isprintable() else " " for c in str(value))
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def show_literally(*texts) -> None:
    """Draw each matplotlib ``Text`` as the characters it holds: ``$...$`` is no mathtext (a name matplotlib
    cannot parse raised when drawn), and no text goes through TeX."""
    for text in texts:
        text.set_parse_math(False)
        text.set_usetex(False)


def phase_rgb(phase: np.ndarray, reliability: np.ndarray, ambiguous: np.ndarray | None = None,
              *, reliability_scale: float | None = None) -> np.ndarray:
    """(Y, X, 3) float RGB: phase colour times brightness from reliability; black background, grey ambiguous.

    Brightness is ``0.35 + 0.65 * clip(reliability / scale, 0, 1)`` with ``scale`` the 95th
    percentile of the reliability over assigned pixels unless given.
    """
    phase = np.asarray(phase)
    rel = np.nan_to_num(np.asarray(reliability, dtype=float), nan=0.0)
    assigned = phase >= 0
    if reliability_scale is None:
        values = rel[assigned]
        reliability_scale = float(np.percentile(values, 95)) if values.size else 1.0
    scale = reliability_scale if reliability_scale > 0 else 1.0
    brightness = 0.35 + 0.65 * np.clip(rel / scale, 0.0, 1.0)
    rgb = np.zeros((*phase.shape, 3))
    colors = PHASE_COLORS[np.where(assigned, phase, 0) % len(PHASE_COLORS)]
    rgb[assigned] = colors[assigned] * brightness[assigned, None]
    if ambiguous is not None:
        amb = np.asarray(ambiguous, dtype=bool) & assigned
        rgb[amb] = AMBIGUOUS_GREY
    return rgb


def save_result_figures(
    out_dir: str | Path,
    *,
    name: str,
    phases: list[str] | tuple[str, ...],
    pcc: np.ndarray,
    phase: np.ndarray,
    reliability: np.ndarray,
    ambiguous: np.ndarray,
    fractions: dict[str, float],
    mask: np.ndarray | None = None,
    title: str = "",
) -> list[Path]:
    """Write ``<name>_phase.png``, ``<name>_pcc.png`` (particle pixels only when ``mask`` is given) and
    ``<name>_fractions.png``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = [label_text(p) for p in phases]
    title = label_text(title) if title else ""
    with plt.rc_context(LITERAL_TEXT):  # sample and phase names are drawn as they are spelled
        return [_phase_figure(plt, out / f"{name}_phase.png", labels, phase, reliability, ambiguous, title),
                _pcc_figure(plt, out / f"{name}_pcc.png", labels, pcc, mask),
                _fraction_figure(plt, out / f"{name}_fractions.png", labels, [fractions.get(p, 0.0) for p in phases],
                                 title)]


def _phase_figure(plt, path: Path, labels: list[str], phase, reliability, ambiguous, title: str) -> Path:
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(6, 5.2))
    ax.imshow(phase_rgb(phase, reliability, ambiguous), interpolation="nearest")
    handles = [Patch(color=PHASE_COLORS[i % len(PHASE_COLORS)], label=p) for i, p in enumerate(labels)]
    handles.append(Patch(color=AMBIGUOUS_GREY, label="ambiguous"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(f"{title}\nphase (colour), reliability (brightness)".strip())
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pcc_figure(plt, path: Path, labels: list[str], pcc, mask) -> Path:
    k = len(labels)
    shown = pcc if mask is None else np.where(np.asarray(mask, bool)[None], pcc, np.nan)
    low = float(np.nanmin(shown)) if np.isfinite(shown).any() else 0.0
    cmap = plt.get_cmap("magma").with_extremes(bad="black")
    fig, axes = plt.subplots(1, k, figsize=(2.6 * k, 2.9), squeeze=False)
    for i, ax in enumerate(axes[0]):
        im = ax.imshow(shown[i], vmin=min(low, 0.99), vmax=1.0, cmap=cmap)
        ax.set_title(f"PCC {labels[i]}")
        ax.set_axis_off()
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fraction_figure(plt, path: Path, labels: list[str], fractions: list[float], title: str) -> Path:
    k = len(labels)
    fig, ax = plt.subplots(figsize=(5, 3))
    # at positions, not categories: two names alike once shortened stay two bars
    ax.bar(range(k), [100 * f for f in fractions], color=[PHASE_COLORS[i % len(PHASE_COLORS)] for i in range(k)])
    ax.set_xticks(range(k), labels)
    ax.set_ylabel("% of particle pixels")
    ax.set_title(title or "phase fractions")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
