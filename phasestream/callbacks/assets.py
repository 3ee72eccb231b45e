"""Reading externally stored images: Resource/Datum handlers and StreamResource/StreamDatum files.

event-model's ``Filler`` fills Resource/Datum references through a handler registry, but does
not fill StreamResource/StreamDatum: :func:`read_stream_frames` opens the file named by the
StreamResource ``uri`` and reads the frames selected by the StreamDatum ``indices``.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

__all__ = ["HDF5_MIMETYPE", "NPY_MIMETYPE", "default_handler_registry", "read_stream_frames"]

HDF5_MIMETYPE = "application/x-hdf5"
NPY_MIMETYPE = "application/x-npy"


def default_handler_registry() -> dict:
    """Handlers for Resource/Datum specs phasestream reads out of the box (``NPY_SEQ``)."""
    from ophyd.sim import NumpySeqHandler

    return {"NPY_SEQ": NumpySeqHandler}


def _local_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme not in ("file", ""):
        raise ValueError(f"cannot read {uri!r}: only file: URIs are supported")
    return Path(unquote(parsed.path))


def read_stream_frames(stream_resource: dict, stream_datum: dict) -> np.ndarray:
    """Frames (N, Y, X) referenced by a StreamDatum, read from its StreamResource's file.

    Parameters
    ----------
    stream_resource : StreamResource document: ``mimetype`` ``application/x-hdf5`` (parameter
        ``dataset``, the path of the (N, Y, X) stack; ``swmr`` optional) or ``application/x-npy``
        (one (N, Y, X) ``.npy`` file), a ``file:`` ``uri``
    stream_datum : StreamDatum of that resource; ``indices`` {start, stop} select the frames
    """
    if stream_datum["stream_resource"] != stream_resource["uid"]:
        raise ValueError(
            f"StreamDatum {stream_datum['uid']!r} refers to StreamResource {stream_datum['stream_resource']!r}, "
            f"not {stream_resource['uid']!r}"
        )
    path = _local_path(stream_resource["uri"])
    params = stream_resource.get("parameters", {})
    start, stop = stream_datum["indices"]["start"], stream_datum["indices"]["stop"]
    mimetype = stream_resource["mimetype"]
    if mimetype == HDF5_MIMETYPE:
        import h5py

        with h5py.File(path, "r", swmr=bool(params.get("swmr", False))) as f:
            return f[params["dataset"]][start:stop]
    if mimetype == NPY_MIMETYPE:
        return np.load(path, mmap_mode="r")[start:stop]
    raise ValueError(f"cannot read mimetype {mimetype!r}; supported: {HDF5_MIMETYPE}, {NPY_MIMETYPE}")
