"""What the split jobs share (``phasestream.jobs.split``): cutting a range into parts, the error of parts that
failed, and the shape of the OD cube they split, checked against the result's metadata."""

from __future__ import annotations

from phasestream.store.results import ResultWriter

__all__ = ["SplitJobError", "od_image_shape", "split_ranges"]


class SplitJobError(RuntimeError):
    """Tasks of a split job failed after their retries (their errors in the message)."""


def split_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges cutting ``range(n)`` into at most ``parts`` pieces of equal length
    (the last one shorter): Zarr, behind Tiled, stores regular chunks only."""
    if n < 1 or parts < 1:
        raise ValueError(f"need n >= 1 and parts >= 1, got n={n}, parts={parts}")
    step = -(-n // parts)
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def od_image_shape(writer: ResultWriter, n: int) -> tuple[int, int]:
    """(Y, X) of the result's images once its ``od`` array holds the ``n`` planes of that size its metadata
    records (``n_energies_seen``, ``image_shape``; more planes are fine until the result is final), else a
    ValueError naming both shapes: the arrays of a split job are sized from the metadata."""
    got = tuple(writer.container["od"].shape)
    if writer.shape is None or len(got) != 3 or got[0] < n or got[1:] != writer.shape:
        wanted = (n, *(writer.shape or ("?", "?")))
        raise ValueError(f"result {writer.path}: its metadata (n_energies_seen, image_shape) describes an od of "
                         f"{wanted}, but its od array is {got}")
    return writer.shape
