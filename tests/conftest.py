"""Shared fixtures: the backends available on this machine."""

from __future__ import annotations

# Python's SQLite first: a test module that imports TensorFlow before any Tiled server starts
# would otherwise load TensorFlow's bundled SQLite, which lacks the FTS5 module Tiled's catalog needs
import sqlite3  # noqa: F401
import threading
import warnings

import pytest
from support import keep_absl_off_captured_streams

from phasestream.kernels.backend import cupy_available

keep_absl_off_captured_streams()


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
        close_embedded_tiled(server)


def close_embedded_tiled(server, timeout: float = 60.0) -> None:
    """``server.close()``, bounded: a request that hangs in the embedded server's DuckDB storage
    (seen once: ``Connection.commit`` in ``SQLAdapter.append_partition`` never returned) would keep
    uvicorn waiting for it, and the test run with it. After ``timeout`` s uvicorn is told to stop
    waiting (``force_exit``) and the hang is reported as a warning; the tests' results stand."""
    from phasestream.store.tiled import close_embedded_tiled as close  # and the log handlers it leaves

    closer = threading.Thread(target=close, args=(server,), daemon=True, name="tiled-close")
    closer.start()
    closer.join(timeout)
    if closer.is_alive():
        server._server.force_exit = True
        closer.join(30)
        warnings.warn(f"the embedded Tiled server at {server.uri} did not stop within {timeout:.0f} s: a request "
                      "hangs in its storage; uvicorn was forced to exit", RuntimeWarning, stacklevel=1)


@pytest.fixture(scope="module")
def tiled_client(tiled_server):
    from phasestream.store.tiled import connect

    return connect(tiled_server.uri)
