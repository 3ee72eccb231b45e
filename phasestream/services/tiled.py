"""Tiled helpers: an embedded server, connecting, raw runs (TiledWriter). Results: ``services.results``.

Raw runs are written by bluesky-tiled-plugins' ``TiledWriter`` (:func:`raw_run_writer`) and read
back as databroker-2 ``BlueskyRun`` objects (:func:`open_raw_run`). Analysis results follow the
DESIGN.md contract "Results in Tiled": one container ``<root>/<run uid>`` with specs
``["PhaseMap"]`` holding the arrays ``od`` (E, Y, X) float32, ``pcc`` (K, Y, X) float32,
``phase`` (Y, X) int16, ``reliability`` (Y, X) float32, ``ambiguous`` and ``mask`` (Y, X) uint8,
... and the result metadata (``state_of_charge`` a float at the top level, so that
``client["phasestream"].search(Key("state_of_charge") == 2.0)`` finds it).

Reading a result back::

    res = client["phasestream"][run_uid]
    od = res["od"][: res.metadata["n_energies_seen"]]     # (E, Y, X) float32
    phase = res["phase"].read()                             # (Y, X) int16
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
from bluesky_tiled_plugins import BlueskyRun, TiledWriter
from tiled.client import from_uri
from tiled.client.container import Container
from tiled.client.utils import ClientError
from tiled.server import SimpleTiledServer

__all__ = [
    "TiledConnectionError",
    "TiledPermissionError",
    "connect",
    "open_raw_run",
    "raw_run_complete",
    "raw_run_writer",
    "start_embedded_tiled",
    "tiled_session",
]

log = logging.getLogger(__name__)



class TiledConnectionError(ConnectionError):
    """The Tiled server cannot be reached."""


class TiledPermissionError(PermissionError):
    """Tiled refused the request: missing or wrong API key, or no write access."""



# --------------------------------------------------------------------------- server and client


def _resolve_api_key(api_key: str | None) -> str:
    """The argument, else ``TILED_API_KEY``, else a fresh random key (32 hex digits)."""
    return api_key or os.environ.get("TILED_API_KEY") or secrets.token_hex(16)


def start_embedded_tiled(
    *,
    api_key: str | None = None,
    directory: str | Path | None = None,
    readable_storage: Sequence[str | Path] | None = None,
    port: int = 0,
) -> SimpleTiledServer:
    """Start a Tiled server with writable storage in a thread of this process, on 127.0.0.1.

    Parameters
    ----------
    api_key : the single API key of the server; default ``TILED_API_KEY``, else a random key
    directory : where the catalog, data and logs go; default a temporary directory removed on close
    readable_storage : directories of external files (detector HDF5 files that TiledWriter
        registers from StreamResource documents) the server may read
    port : TCP port; 0 picks a free one

    Returns
    -------
    The running server. ``server.uri`` already carries ``?api_key=``: pass it to :func:`connect`
    without ``api_key``. Keep a reference and close it (``server.close()`` or ``with``): the
    server thread keeps the process alive, and the server stops when garbage-collected.
    """
    key = _resolve_api_key(api_key)
    if not (key.isascii() and key.isalnum()):
        # Tiled refuses such a key at startup, but only reports a 20 s startup timeout.
        raise ValueError("the Tiled API key must be ASCII letters and digits only, e.g. secrets.token_hex(16)")
    storage = [Path(p) for p in readable_storage] if readable_storage else None
    server = SimpleTiledServer(directory=directory, api_key=key, port=port,
                               readable_storage=storage)
    log.info("embedded Tiled server at %s (data in %s)", _redact(server.uri), server.directory)
    return server


def _redact(uri: str) -> str:
    """``uri`` without its ``api_key`` query parameter, for messages and logs."""
    parts = urlsplit(uri)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "api_key"]
    return urlunsplit(parts._replace(query=urlencode(query)))


def connect(uri: str | None = None, *, api_key: str | None = None) -> Container:
    """A Tiled client for ``uri``.

    Parameters
    ----------
    uri : e.g. ``server.uri`` or ``http://host:8000/api/v1``; default the ``TILED_URI`` variable
    api_key : wins over an ``api_key`` in the URI; without both, ``TILED_API_KEY`` is used

    Raises
    ------
    TiledConnectionError : nothing answers at ``uri``
    TiledPermissionError : the server wants a key and none, or a wrong one, was given
    """
    uri = uri or os.environ.get("TILED_URI")
    if not uri:
        raise ValueError("no Tiled URI: pass uri= (--tiled URI), set TILED_URI, or use start_embedded_tiled()")
    if api_key is not None:
        uri = _redact(uri)  # the explicit key wins; tiled refuses a key given twice
    elif "api_key" not in dict(parse_qsl(urlsplit(uri).query)):
        api_key = os.environ.get("TILED_API_KEY") or None
    where = _redact(uri)
    try:
        httpx.get(where, timeout=5.0, follow_redirects=True)  # fail fast instead of tiled's 45 s of retries
    except httpx.TransportError as error:
        raise TiledConnectionError(
            f"cannot reach Tiled at {where}: {error}. Is the server running? Check the URI (--tiled)."
        ) from error
    try:
        return from_uri(uri, api_key=api_key)
    except RuntimeError as error:
        if "API key" not in str(error):
            raise
        raise TiledPermissionError(
            f"Tiled at {where} requires an API key: set TILED_API_KEY or pass api_key="
        ) from error
    except ClientError as error:
        if error.response.status_code not in (401, 403):
            raise
        raise TiledPermissionError(
            f"Tiled at {where} rejected the API key ({error}): check TILED_API_KEY or api_key="
        ) from error


def raw_run_writer(client: Container, *, batch_size: int = 1) -> TiledWriter:
    """A TiledWriter that stores raw runs under ``client`` (``client[<run uid>]``).

    Subscribe it to a RunEngine (``RE.subscribe(raw_run_writer(client))``). ``batch_size=1``
    writes every event as it arrives (live use); larger batches suit bulk migration.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return TiledWriter(client, batch_size=batch_size)


def open_raw_run(client: Container, uid: str) -> BlueskyRun:
    """The raw run ``uid`` as a databroker-2 BlueskyRun: ``run["primary"]["det_img"].read()``."""
    try:
        run = client[uid]
    except KeyError as error:
        raise KeyError(f"no raw run {uid!r} in Tiled at {client.uri}: was TiledWriter subscribed?") from error
    if not isinstance(run, BlueskyRun):
        specs = [spec.name for spec in run.specs]
        raise TypeError(f"Tiled node {uid!r} is not a BlueskyRun (specs {specs}); is it a raw run uid?")
    return run


def raw_run_complete(client: Container, uid: str) -> bool:
    """True when the raw run's stop document has been written (``metadata["stop"]``)."""
    return open_raw_run(client, uid).metadata.get("stop") is not None


# --------------------------------------------------------------------------- results


@contextlib.contextmanager
def tiled_session(
    uri: str | None = None,
    *,
    directory: str | Path | None = None,
    readable_storage: Sequence[str | Path] | None = None,
) -> Iterator[tuple[Container, str]]:
    """``(client, uri)`` for ``uri``, or for an embedded server (over ``directory`` when given) closed on exit."""
    if uri:
        yield connect(uri), uri
        return
    server = start_embedded_tiled(directory=directory, readable_storage=readable_storage)
    try:
        yield connect(server.uri), server.uri
    finally:
        server.close()
