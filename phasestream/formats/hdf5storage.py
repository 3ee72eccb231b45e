"""What an HDF5 dataset actually stores, against what it declares: its stored bytes, where they end, and
which of its chunks were never written.

h5py reads a chunk that was never written (an aborted scan, a file that declares a stack it never filled)
as the dataset's fill value, 0 by default: counts that were never measured. The readers refuse a dataset
that declares far more than it stores (:func:`check_stored`, the bound of
:func:`~phasestream.formats.stack.check_expansion`) and mark what was never written as NaN, unmeasured
(:func:`unwritten`), as the TIFF reader refuses strips without data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from phasestream.formats.stack import check_expansion

__all__ = ["Unwritten", "check_stored", "stored_extent", "unwritten"]


def check_stored(path: Path, dataset: h5py.Dataset, what: str) -> None:
    """Refuse ``dataset`` when it declares far more bytes than it stores (chunks never written, a decompression
    bomb), before it is read. Its stored bytes are what HDF5 reports, at most the file's size (a forged chunk
    index may claim more)."""
    stored = min(int(dataset.id.get_storage_size()), Path(path).stat().st_size)
    check_expansion(path, f"{what} ({dataset.name})", int(dataset.size) * dataset.dtype.itemsize, stored)


def stored_extent(dataset: h5py.Dataset) -> int:
    """The end (byte offset) of the last byte ``dataset``'s stored data occupy in its file (0 for data kept in
    the object header or not yet written)."""
    ident = dataset.id
    layout = ident.get_create_plist().get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        offset = ident.get_offset()
        return 0 if offset is None else int(offset) + int(ident.get_storage_size())
    if layout == h5py.h5d.CHUNKED:
        ends = [0]
        # one pass over the chunk index (get_chunk_info(i) walks it from the start: quadratic in the chunks)
        ident.chunk_iter(lambda info: ends.append(int(info.byte_offset) + int(info.size)))
        return max(ends)
    return 0


@dataclass(frozen=True)
class Unwritten:
    """Where a dataset of ``shape`` was never written: ``grid`` over its chunks (of shape ``chunks``), True for a
    chunk never written. Contiguous storage never written is one chunk, the whole dataset."""

    grid: np.ndarray
    chunks: tuple[int, ...]
    shape: tuple[int, ...]

    def plane(self, index: int) -> np.ndarray:
        """Boolean mask over ``shape[1:]``: the elements of plane ``index`` (along axis 0) never written."""
        mask = self.grid[index // self.chunks[0]]
        for axis, (size, length) in enumerate(zip(self.chunks[1:], self.shape[1:], strict=True)):
            mask = np.repeat(mask, size, axis=axis)[(slice(None),) * axis + (slice(0, length),)]
        return mask

    def unmeasured_planes(self) -> list[int]:
        """Indices along axis 0 of the planes never written at all."""
        rows = self.grid.reshape(self.grid.shape[0], -1).all(axis=1)
        return [i for i in range(self.shape[0]) if rows[i // self.chunks[0]]]

    def mark(self, frames: np.ndarray, indices) -> None:
        """Set to NaN, in place, what was never written of ``frames``: the planes ``indices`` along axis 0 (a
        float array of ``(len(indices), *shape[1:])``)."""
        if not self.shape:
            frames[...] = np.nan
            return
        for row, index in enumerate(indices):
            mask = self.plane(index)
            np.copyto(frames[row:row + 1], np.nan, where=mask[np.newaxis])


def unwritten(dataset: h5py.Dataset) -> Unwritten | None:
    """Where ``dataset`` was never written (see :class:`Unwritten`), None when every chunk was."""
    ident = dataset.id
    layout = ident.get_create_plist().get_layout()
    shape = tuple(int(n) for n in dataset.shape or ())
    if dataset.size == 0:
        return None
    if layout == h5py.h5d.CONTIGUOUS:
        if ident.get_offset() is not None:
            return None
        return Unwritten(np.ones((1,) * len(shape), dtype=bool), shape, shape)
    if layout != h5py.h5d.CHUNKED:
        return None
    chunks = tuple(int(n) for n in dataset.chunks)
    grid_shape = tuple(math.ceil(n / c) for n, c in zip(shape, chunks, strict=True))
    if ident.get_num_chunks() == math.prod(grid_shape):
        return None
    written = np.zeros(grid_shape, dtype=bool)

    def chunk(info) -> None:
        written[tuple(int(o) // c for o, c in zip(info.chunk_offset, chunks, strict=True))] = True

    ident.chunk_iter(chunk)
    return Unwritten(~written, chunks, shape)
