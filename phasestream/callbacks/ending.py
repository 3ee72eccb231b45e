"""How a run ends: the status its images give it at stop, what its final maps change, and its timings.

Pure functions of what a :class:`~phasestream.callbacks.analysis.RunAnalysis` counted; the status
they give is provisional: the final write makes it ``partial`` or ``failed`` when a write failed or
an array does not read back from Tiled as written (docs/contract.md, "Status").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["run_timings", "status_at_stop", "status_of_maps"]


def status_at_stop(n: int, expected: int | None, exit_status: str, reason: str, *, incomplete: bool,
                   first_error: str | None) -> tuple[str, list[str]]:
    """``(status, errors to record)`` of a run that ends after ``n`` analysed energies of ``expected``.

    ``failed`` without any usable image; ``partial`` when documents were lost (``incomplete``), the run
    did not end with ``exit_status`` "success", fewer energies than expected arrived or fewer than two
    (phase maps need two); else ``complete``.
    """
    errors = []
    if n == 0:
        errors.append(f"no usable image in the run{f' (first problem: {first_error})' if first_error else ''}")
    if n and expected and n < expected:
        errors.append(f"{n} of {expected} energies analysed")
    if n == 1:
        errors.append("only 1 energy analysed: phase maps need at least 2")
    if n and exit_status != "success":
        errors.append(f"run ended with exit_status {exit_status!r:.40} {reason!s:.200}".strip())
    if n == 0:
        return "failed", errors
    if incomplete or exit_status != "success" or (expected and n < expected) or n < 2:
        return "partial", errors
    return "complete", errors


def status_of_maps(status: str, n: int, summary: Mapping) -> tuple[str, list[str]]:
    """``(status, errors to record)`` once the final maps' ``summary`` is known: ``failed`` when every pixel's OD
    is masked, no better than ``partial`` when the particle mask is empty (fractions undefined)."""
    if not n or summary.get("particle_pixels"):
        return status, []
    if not summary.get("valid_pixels"):
        return "failed", ["every pixel's OD is masked (zero, negative or non-finite counts or I0): nothing could "
                          "be analysed"]
    return ("partial" if status == "complete" else status), [
        "no particle pixels found (the particle mask is empty): phase fractions are undefined"]


def run_timings(n: int, stop: float, first_image: float | None, last_image: float | None,
                frame_seconds: Sequence[float], event_latency: Sequence[float]) -> dict:
    """The run's ``timings``: seconds from the first image to ``stop``, the median analysis time per frame, images
    per second between the first and last image, and the event-to-analysed latency (median, 95th percentile)."""
    return {
        "first_image_to_stop_s": (stop - first_image) if first_image else None,
        "median_frame_ms": 1e3 * float(np.median(frame_seconds)) if n else None,
        "images_per_s": (n - 1) / (last_image - first_image)
        if n > 1 and first_image and last_image and last_image > first_image else None,
        "event_latency_ms": {"median": 1e3 * float(np.median(event_latency)),
                             "p95": 1e3 * float(np.percentile(event_latency, 95))}
        if len(event_latency) else None,
    }
