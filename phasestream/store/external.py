"""Files a raw run points at instead of holding their data: the mimetypes phasestream registers in Tiled.

TiledWriter registers a StreamResource's file through a *consolidator* chosen by mimetype
(bluesky-tiled-plugins ``CONSOLIDATOR_REGISTRY``) and Tiled reads it through the adapter of that
mimetype. Out of the box, ``application/x-hdf5`` (HDF5 dataset) and ``multipart/related;type=image/tiff``
(one TIFF file per frame, named by a template) work end to end. A single multi-page TIFF
(``image/tiff``) has Tiled's ``TiffAdapter``, which takes one ``data_uri``, but no consolidator: the
registry's fallback registers the file as a list of URIs, which that adapter cannot be built from, so
the node is registered and every read of it fails. :class:`TiffFileConsolidator` registers it as the
adapter's one ``data_uri``; :func:`register_consolidators` puts it in the registry (once, and only
where nothing else claims ``image/tiff``).
"""

from __future__ import annotations

from typing import ClassVar

from bluesky_tiled_plugins.writing.consolidators import CONSOLIDATOR_REGISTRY, ConsolidatorBase
from tiled.structures.data_source import Asset

__all__ = ["TIFF_FILE_MIMETYPE", "TIFF_SEQUENCE_MIMETYPE", "TiffFileConsolidator", "register_consolidators"]

#: one multi-page TIFF file, a page per frame (Tiled's ``TiffAdapter``)
TIFF_FILE_MIMETYPE = "image/tiff"
#: one single-page TIFF file per frame (Tiled's ``TiffSequenceAdapter``; TiledWriter's ``TIFFConsolidator``)
TIFF_SEQUENCE_MIMETYPE = "multipart/related;type=image/tiff"


class TiffFileConsolidator(ConsolidatorBase):
    """One multi-page TIFF whose pages are the frames, in order; Tiled reads it as one chunk.

    StreamResource: ``mimetype`` ``image/tiff``, ``uri`` the file; no parameters are needed (give no
    ``chunk_shape``: Tiled's TIFF adapter serves the file as a single chunk).
    """

    supported_mimetypes: ClassVar[set[str]] = {TIFF_FILE_MIMETYPE}

    def __init__(self, stream_resource, descriptor):
        super().__init__(stream_resource, descriptor)
        # TiffAdapter(data_uri=...): a single-valued asset (no ``num``), not the base's list ``data_uris``
        self.assets = [Asset(data_uri=self.uri, is_directory=False, parameter="data_uri", num=None)]


def register_consolidators() -> None:
    """Make TiledWriter register ``image/tiff`` files readably (idempotent; an existing entry is kept)."""
    CONSOLIDATOR_REGISTRY.setdefault(TIFF_FILE_MIMETYPE, TiffFileConsolidator)
