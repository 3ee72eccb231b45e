"""The external OD store: ``od`` cubes written by phasestream as zarr arrays and registered in Tiled.

With ``--od-store DIR`` the (E, Y, X) OD cube of a run is written to ``DIR/<root>/<run uid>/od.zarr``
(paths checked inside ``DIR``, docs/security.md) and registered as external data; the server must
be able to read ``DIR`` (:func:`check_od_store`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tiled.client.container import Container
from tiled.mimetypes import ZARR_MIMETYPE
from tiled.structures.array import ArrayStructure, BuiltinDtype
from tiled.structures.core import StructureFamily
from tiled.structures.data_source import Asset, DataSource, Management
from tiled.utils import ensure_uri, path_from_uri

from phasestream.contract import OD_DTYPE, path_inside
from phasestream.store.tiled import explained_refusal

__all__ = ["OD_ZARR_CONFIG", "PlaneReader", "check_od_store", "check_own_od", "delete_node", "external_od_path",
           "external_source", "flush_and_drop", "new_od_zarr", "plane_structure", "remove_od_store"]

log = logging.getLogger(__name__)

#: External ``od``: write every plane as it comes (zarr's default compares each chunk with the
#: fill value first, to skip empty ones: a full pass over 16 MB per 2048^2 plane for nothing).
OD_ZARR_CONFIG = {"write_empty_chunks": True}


def external_od_path(od_node: Any | None) -> Path | None:
    """Directory of a result's ``od`` node when it is external data (written with ``od_store``), else None."""
    if od_node is None:
        return None
    with explained_refusal("read", "od"):
        sources = od_node.data_sources() or []
    for source in sources:
        if source.management == Management.external and source.mimetype == ZARR_MIMETYPE and source.assets:
            return Path(path_from_uri(source.assets[0].data_uri))
    return None


def check_own_od(path: Path, store: Path | None, result_path: str) -> None:
    """Refuse (OSError) an external ``od`` at ``path`` unless it is the one of the result ``<root>/<key>``
    (``result_path``) in ``store``, the OD store configured here: the path comes from Tiled."""
    if store is None or Path(path).resolve() != path_inside(store, *result_path.rsplit("/", 1), "od.zarr"):
        raise OSError(f"the OD cube of {result_path} is registered in Tiled at {path}, not where this result's lies "
                      f"in the OD store configured here ({store}): not written")


def new_od_zarr(path: Path, shape: tuple[int, ...]) -> zarr.Array:
    """A new (zero) uncompressed float32 zarr array at ``path``, one chunk per plane (axis 0)."""
    return zarr.create_array(str(path), shape=shape, chunks=(1, *shape[1:]), dtype=OD_DTYPE, compressors=None,
                             fill_value=0.0, dimension_names=("energy", "y", "x"), overwrite=True,
                             config=OD_ZARR_CONFIG)


def external_source(structure: ArrayStructure, path: Path) -> DataSource:
    """The Tiled data source of a zarr array at ``path`` that phasestream writes itself."""
    return DataSource(structure=structure, structure_family=StructureFamily.array, mimetype=ZARR_MIMETYPE,
                      management=Management.external,
                      assets=[Asset(data_uri=ensure_uri(str(path)), is_directory=True, parameter="data_uri")])


def check_od_store(client: Container, od_store: str | Path) -> Path:
    """Check that the Tiled server serves what is written in ``od_store``; return it (absolute).

    Tiled registers external data anywhere but reads only its ``readable_storage``: without this
    check a misconfigured server would be found out only when someone reads ``od``. A tiny zarr
    array is written, registered under a scratch key, read back and removed again.

    Raises
    ------
    OSError : ``od_store`` cannot be written; PermissionError : the server cannot read it
    """
    root = Path(od_store).resolve()
    key = f"phasestream-od-store-check-{os.getpid()}-{threading.get_ident()}"
    path = root / key / "od.zarr"
    expected = np.arange(6, dtype=OD_DTYPE).reshape(1, 2, 3)
    try:
        new_od_zarr(path, expected.shape)[:] = expected
    except OSError as error:
        raise OSError(f"cannot write the OD store {root}: {error}") from error
    source = external_source(plane_structure(1, expected.shape[1:]), path)
    advice = ("add it to the server's readable_storage (deploy/tiled/config.yml: PHASESTREAM_OD_STORE), on a "
              "filesystem the server sees at the same path")
    try:
        try:
            node = client.new(StructureFamily.array, [source], key=key)
        except Exception as error:
            raise PermissionError(f"the Tiled server refused to register the OD store {root} ({error})") from error
        try:
            got = node.read()
        except Exception as error:  # the server refuses to serve it (500, or the connection dropped)
            raise PermissionError(f"the Tiled server cannot read the OD store {root} ({error}): {advice}") from error
        finally:
            delete_node(client, key)
    finally:
        remove_od_store(path, root)
    if not np.array_equal(got, expected):
        raise PermissionError(f"the Tiled server reads other data than was written in the OD store {root}: {advice}")
    return root


def delete_node(client: Container, key: str, attempts: int = 3) -> None:
    """Delete ``client[key]``, trying again when the connection was dropped by an earlier failure."""
    for attempt in range(attempts):
        try:
            client.delete_contents(key, external_only=False)
            return
        except Exception:
            if attempt == attempts - 1:
                raise


def flush_and_drop(path: Path) -> None:
    """Make a written file durable and take it out of the page cache.

    OD planes are written once and read rarely: left in the page cache, every plane takes fresh
    memory pages, and first touching them is the costliest part of a write on a virtual machine
    (about 40 ms of CPU per 16 MB plane measured here, 4 ms with this). fsync also means a plane
    counted as written is on disk.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class PlaneReader:
    """Reads the chunk files of an external ``od`` (one plane each, stored as its bytes: :func:`new_od_zarr`) from
    the disk into one reused buffer, leaving nothing of them in the page cache: ``O_DIRECT`` where the file
    system takes it (the buffer is page-aligned), else read and dropped again. Against reading the plane through
    zarr into a new array, about 10 ms less per 2048^2 plane, and the plane does not come back into the cache."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        size = -(-max(self.nbytes, 1) // mmap.PAGESIZE) * mmap.PAGESIZE  # O_DIRECT reads whole pages
        self._buffer = mmap.mmap(-1, size)
        self._direct = hasattr(os, "O_DIRECT")

    @staticmethod
    def stored_as_bytes(array: zarr.Array) -> bool:
        """Whether each chunk file of ``array`` holds one (Y, X) plane as its little-endian float32 bytes."""
        from zarr.codecs import BytesCodec

        return (getattr(array.metadata, "codecs", None) == (BytesCodec(endian="little"),)
                and array.dtype == np.dtype("<f4") and tuple(array.chunks) == (1, *array.shape[1:]))

    def read(self, path: Path) -> np.ndarray | None:
        """The bytes of the chunk file ``path`` (uint8, a view of the buffer valid until the next read); None when
        the file does not hold exactly one plane."""
        if self._direct:
            try:
                return self._read(path, os.O_DIRECT)
            except OSError as error:
                if error.errno != errno.EINVAL:  # EINVAL: this file system takes no O_DIRECT (read as below)
                    raise
                self._direct = False
        return self._read(path, 0)

    def _read(self, path: Path, flags: int) -> np.ndarray | None:
        fd = os.open(path, os.O_RDONLY | flags)
        try:
            if os.fstat(fd).st_size != self.nbytes:
                return None
            n = os.preadv(fd, [self._buffer], 0)
            if not flags and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return np.frombuffer(self._buffer, dtype=np.uint8, count=self.nbytes) if n == self.nbytes else None


def remove_od_store(path: Path | None, store: str | Path | None) -> None:
    """Remove an external ``od`` zarr directory (``.../<run uid>/od.zarr``) and its run folder if empty.

    Only a directory inside ``store``, the OD store configured here, is removed: the path comes from
    Tiled, and one registered elsewhere (another worker's store, or none configured here) is left alone.
    """
    if path is None or path.name != "od.zarr":
        return
    if store is None or not Path(path).resolve().is_relative_to(Path(store).resolve()):
        log.warning("external od %s lies outside the OD store configured here (%s); left in place", path, store)
        return
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def plane_structure(n_planes: int, shape: tuple[int, int]) -> ArrayStructure:
    """(E, Y, X) float32 with one chunk per energy plane."""
    return ArrayStructure(shape=(n_planes, *shape), chunks=((1,) * n_planes, (shape[0],), (shape[1],)),
                          dims=("energy", "y", "x"), data_type=BuiltinDtype.from_numpy_dtype(OD_DTYPE))
