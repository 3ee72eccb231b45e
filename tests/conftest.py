"""Shared fixtures: the backends available on this machine."""

from __future__ import annotations

# Python's SQLite first: a test module that imports TensorFlow before any Tiled server starts
# would otherwise load TensorFlow's bundled SQLite, which lacks the FTS5 module Tiled's catalog needs
import sqlite3  # noqa: F401

import pytest

from phasestream.kernels.backend import cupy_available


def _backend_params():
    gpu = pytest.mark.skipif(not cupy_available(), reason="no usable CuPy GPU on this machine")
    return ["numpy", "numba", pytest.param("cupy", marks=[pytest.mark.gpu, gpu])]


@pytest.fixture(params=_backend_params())
def backend(request) -> str:
    """Every kernel backend; cupy is skipped cleanly without a GPU."""
    return request.param


# Module scope, not session: two SimpleTiledServers alive in one process share Tiled's global
# settings, and starting a second one invalidates the first one's API key (401).
@pytest.fixture(scope="module")
def detector_files(tmp_path_factory):
    """A folder for detector files that the shared Tiled server may read (external HDF5 frames)."""
    return tmp_path_factory.mktemp("detector-files")


@pytest.fixture(scope="module")
def tiled_server(detector_files):
    """An embedded Tiled server (API key, writable storage) per test module; closed after it."""
    from phasestream.store.tiled import start_embedded_tiled

    server = start_embedded_tiled(readable_storage=[detector_files])
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def tiled_client(tiled_server):
    from phasestream.store.tiled import connect

    return connect(tiled_server.uri)
