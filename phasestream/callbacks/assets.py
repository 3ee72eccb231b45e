"""Reading externally stored images: Resource/Datum handlers and StreamResource/StreamDatum files.

event-model's ``Filler`` fills Resource/Datum references through a handler registry, but does
not fill StreamResource/StreamDatum: :func:`read_stream_frames` opens the file named by the
StreamResource ``uri`` and reads the frames selected by the StreamDatum ``indices``.

Every file name in these documents comes from the network. A file is read only when it is a
regular file inside one of the configured asset folders (:class:`AssetFolders`, ``serve
--asset-dir``), symbolic links resolved first; with no folder configured none is read. An HDF5
dataset reached through an external link, or kept in external or virtual storage, is refused: it
would read a host file no folder vouches for. The frames a datum selects are bounded before any is read.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from phasestream.contract import DocumentBounds

__all__ = ["HDF5_MIMETYPE", "NPY_MIMETYPE", "AssetFolders", "AssetRefused", "NumpySeqHandler",
           "default_handler_registry", "guarded_registry", "read_stream_frames"]

HDF5_MIMETYPE = "application/x-hdf5"
NPY_MIMETYPE = "application/x-npy"


class AssetRefused(ValueError):
    """A file a document names that is not read (outside the asset folders, not a regular file, or
    referring to other files). A ValueError, not an OSError: event-model's Filler retries OSErrors."""


class AssetFolders:
    """The folders whose files a document (Resource, StreamResource) may name; none: no file is read."""

    def __init__(self, folders: Sequence[str | Path] = ()):
        self.folders = tuple(Path(f).resolve() for f in folders)

    def __repr__(self) -> str:
        return f"AssetFolders({[str(f) for f in self.folders]})"

    def check(self, path: str | Path) -> Path:
        """``path`` resolved, when it is a regular file inside a folder; else :class:`AssetRefused` saying why."""
        if not self.folders:
            raise AssetRefused(f"the document names the host file {str(path)!r:.200}, and no asset folder is "
                                  f"configured (serve --asset-dir): external images are not read")
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(folder) for folder in self.folders):
            raise AssetRefused(f"{str(path)!r:.200} lies outside the asset folders "
                                  f"{[str(f) for f in self.folders]}: not read")
        try:
            mode = os.stat(resolved).st_mode
        except OSError as error:
            raise FileNotFoundError(f"cannot read {str(path)!r:.200}: {error.strerror}") from None
        if not stat.S_ISREG(mode):
            raise AssetRefused(f"{str(path)!r:.200} is not a regular file (a FIFO, device or folder): not read")
        return resolved


class NumpySeqHandler:
    """``NPY_SEQ`` (ophyd.sim's spec): frame ``index`` of a resource is the file ``<path>_<index>.npy``.

    Unlike ophyd.sim's handler, the index must be a non-negative integer (a string index could name
    ``../`` paths) and every file is checked against ``folders`` before it is read."""

    specs = frozenset({"NPY_SEQ"})

    def __init__(self, filename: str, root: str = "", *, folders: AssetFolders):
        if not isinstance(filename, str) or not isinstance(root, str):
            raise ValueError("NPY_SEQ resource_path and root must be strings")
        self._name = os.path.join(root, filename)
        self._folders = folders

    def __call__(self, index: int) -> np.ndarray:
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValueError(f"NPY_SEQ datum index must be a non-negative integer, got {index!r:.40}")
        return np.load(self._folders.check(f"{self._name}_{index}.npy"), allow_pickle=False)


def default_handler_registry(folders: AssetFolders) -> dict:
    """Handlers for Resource/Datum specs phasestream reads out of the box (``NPY_SEQ``), confined to ``folders``."""
    return {"NPY_SEQ": lambda filename, **kwargs: NumpySeqHandler(filename, **kwargs, folders=folders)}


def guarded_registry(registry: dict, folders: AssetFolders) -> dict:
    """A caller's handlers, each built only for a resource whose path lies inside ``folders`` (the handler,
    trusted configuration, answers for the files its datum reads)."""

    def guarded(handler: Callable) -> Callable:
        def make(resource_path: str, **kwargs):
            folders.check(os.path.join(kwargs.get("root", ""), resource_path)
                          if isinstance(kwargs.get("root", ""), str) else resource_path)
            return handler(resource_path, **kwargs)

        return make

    return {spec: guarded(handler) for spec, handler in registry.items()}


def _local_path(uri: object) -> Path:
    if not isinstance(uri, str):
        raise ValueError(f"StreamResource uri must be a string, got {type(uri).__name__}")
    parsed = urlparse(uri)
    if parsed.scheme not in ("file", ""):
        raise ValueError(f"cannot read {uri!r:.200}: only file: URIs are supported")
    return Path(unquote(parsed.path))


def _frame_range(indices: object, bounds: DocumentBounds) -> tuple[int, int]:
    start, stop = (indices.get("start"), indices.get("stop")) if isinstance(indices, dict) else (None, None)
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (start, stop)) or not 0 <= start < stop:
        raise ValueError(f"StreamDatum indices must be integers 0 <= start < stop, got {indices!r:.80}")
    if stop - start > bounds.max_num_points:
        raise ValueError(f"StreamDatum covers {stop - start} frames, more than --max-num-points "
                         f"({bounds.max_num_points})")
    return start, stop


def _check_frames(shape: tuple[int, ...], bounds: DocumentBounds) -> None:
    if len(shape) != 3 or int(np.prod(shape[1:])) > bounds.max_image_pixels:
        raise ValueError(f"the frames must be (N, Y, X) of at most {bounds.max_image_pixels} pixels, got {shape}")


def _hdf5_dataset(handle, name: object):
    """The dataset ``name`` of an open file, reached through no external link and kept in the file itself."""
    import h5py

    if not isinstance(name, str) or not name.strip("/"):
        raise ValueError(f"StreamResource parameter 'dataset' must name an HDF5 dataset, got {name!r:.80}")
    node = handle
    for part in name.strip("/").split("/"):
        link = node.get(part, getlink=True) if isinstance(node, h5py.Group) else None
        if link is None:
            raise ValueError(f"no dataset {name!r:.200} in the file")
        if isinstance(link, h5py.ExternalLink):
            raise AssetRefused(f"{name!r:.200} passes through an external link to {link.filename!r:.80}: not read")
        node = node[part]
    if not isinstance(node, h5py.Dataset):
        raise ValueError(f"{name!r:.200} is not a dataset")
    if node.external or node.is_virtual:
        raise AssetRefused(f"{name!r:.200} keeps its data in other files (external or virtual storage): not read")
    return node


def read_stream_frames(stream_resource: dict, stream_datum: dict, *, folders: AssetFolders,
                       bounds: DocumentBounds | None = None) -> np.ndarray:
    """Frames (N, Y, X) referenced by a StreamDatum, read from its StreamResource's file.

    Parameters
    ----------
    stream_resource : StreamResource document: ``mimetype`` ``application/x-hdf5`` (parameter
        ``dataset``, the path of the (N, Y, X) stack; ``swmr`` optional) or ``application/x-npy``
        (one (N, Y, X) ``.npy`` file), a ``file:`` ``uri``
    stream_datum : StreamDatum of that resource; ``indices`` {start, stop} select the frames
    folders : where the file must lie (:class:`AssetFolders`)
    bounds : the most frames and pixels per frame read (default :class:`DocumentBounds`)
    """
    bounds = bounds or DocumentBounds()
    if stream_datum["stream_resource"] != stream_resource["uid"]:
        raise ValueError(
            f"StreamDatum {stream_datum['uid']!r:.80} refers to StreamResource "
            f"{stream_datum['stream_resource']!r:.80}, "
            f"not {stream_resource['uid']!r:.80}"
        )
    start, stop = _frame_range(stream_datum.get("indices"), bounds)
    mimetype = stream_resource.get("mimetype")
    if mimetype not in (HDF5_MIMETYPE, NPY_MIMETYPE):
        raise ValueError(f"cannot read mimetype {mimetype!r:.80}; supported: {HDF5_MIMETYPE}, {NPY_MIMETYPE}")
    path = folders.check(_local_path(stream_resource.get("uri")))
    params = stream_resource.get("parameters") or {}
    if mimetype == HDF5_MIMETYPE:
        import h5py

        with h5py.File(path, "r", swmr=params.get("swmr") is True) as f:
            dataset = _hdf5_dataset(f, params.get("dataset"))
            _check_frames(dataset.shape, bounds)
            return dataset[start:stop]
    frames = np.load(path, mmap_mode="r", allow_pickle=False)
    _check_frames(frames.shape, bounds)
    return np.array(frames[start:stop])
