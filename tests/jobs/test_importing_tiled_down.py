"""``phasestream import`` with Tiled gone between the connection and the import: Tiled's error goes to the
caller, never reported as a fault of the file.

A module of its own: it starts a second embedded Tiled server in this process, and two in one process share
Tiled's global settings, so a module's own server answers 401 once another has started (GOTCHAS.md). Here no
other server is in use.
"""

from __future__ import annotations

import numpy as np
import pytest

from phasestream.formats import ImportedStack
from phasestream.jobs.importing import ImportOptions, import_stack
from phasestream.references import load_references, select_energies

ENERGIES = select_energies(load_references("nvpf-synthetic"), 6)


def _stack(path) -> ImportedStack:
    images = np.random.default_rng(31).integers(1000, 5000, (len(ENERGIES), 8, 8)).astype(np.uint16)
    np.save(path, images)
    return ImportedStack(path, "tiff", np.asarray(ENERGIES), images, files=(path,))


def test_tiled_down_is_not_taken_for_a_fault_of_the_file(tmp_path):
    """The catch-all that makes a reader's unforeseen exception the file's error also caught Tiled's: with Tiled
    down, a good file was reported "refused, nothing written: reading FILE failed: ConnectError". Tiled's errors go
    to the caller, which reports the import failed and says so (:func:`phasestream.jobs.importing.run`)."""
    import httpx
    import stamina

    from phasestream.store.tiled import connect, start_embedded_tiled

    server = start_embedded_tiled(directory=tmp_path / "tiled")
    client = connect(server.uri)
    server.close()  # Tiled goes away between the connection and the import
    with stamina.set_testing(True), pytest.raises(httpx.TransportError):  # the client's retries: once, at once
        import_stack(client, _stack(tmp_path / "good.npy"), ImportOptions(references="nvpf-synthetic"))
