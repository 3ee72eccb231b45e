"""Tiled helpers: an embedded server, connecting, raw runs (TiledWriter). Results: ``phasestream.store.results``.

Raw runs are written by bluesky-tiled-plugins' ``TiledWriter`` (:func:`raw_run_writer`) and read
back as databroker-2 ``BlueskyRun`` objects (:func:`open_raw_run`). Analysis results follow the
contract (docs/contract.md, "Results in Tiled"): one container ``<root>/<run uid>`` with specs
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
import contextvars
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
from bluesky_tiled_plugins import BlueskyRun, TiledWriter
from bluesky_tiled_plugins.exporters import json_seq_exporter
from tiled.client import from_uri
from tiled.client.container import DEFAULT_STRUCTURE_CLIENT_DISPATCH, Container
from tiled.client.utils import ClientError
from tiled.media_type_registration import default_serialization_registry
from tiled.server import SimpleTiledServer
from tiled.utils import OneShotCachedMap

from phasestream.contract import check_raw_path, check_run_uid
from phasestream.store.external import register_consolidators

__all__ = [
    "BLUESKY_RUN_DOCUMENTS",
    "BLUESKY_RUN_MEDIA_TYPES",
    "HiddenKey",
    "TiledConnectionError",
    "TiledPermissionError",
    "api_key_scope",
    "close_embedded_tiled",
    "connect",
    "describe_tiled_error",
    "ensure_container",
    "explained_refusal",
    "open_raw_run",
    "public_uri",
    "raw_run_complete",
    "raw_run_link",
    "raw_run_path",
    "raw_run_writer",
    "raw_runs",
    "separate_api_key",
    "start_embedded_tiled",
    "structure_clients",
    "tiled_session",
    "wait_for_tiled",
]

log = logging.getLogger(__name__)


class _TiledError:
    """Why (``cause``) and where (``uri``, without secrets); shown as ``"<cause> (Tiled at <uri>)"``."""

    def __init__(self, cause: str, uri: str = ""):
        super().__init__(cause)
        self.cause, self.uri = cause, public_uri(uri) if uri else ""

    def __str__(self) -> str:
        return f"{self.cause} (Tiled at {self.uri})" if self.uri else self.cause


class TiledConnectionError(_TiledError, ConnectionError):
    """The Tiled server cannot be reached."""


class TiledPermissionError(_TiledError, PermissionError):
    """Tiled refused the request: missing or wrong API key, or no write access."""


def ensure_container(client: Container, path: str, created: Callable[[Container], None] | None = None) -> Container:
    """``client[path]``, creating the missing containers along ``path`` ("a" or "a/b"; "": ``client``), each one
    passed to ``created``; one that another process created meanwhile (409) is taken as it is."""
    node = client
    for key in path.strip("/").split("/") if path.strip("/") else ():
        if key not in node:
            try:
                made = node.create_container(key)
            except ClientError as error:
                if error.response.status_code != 409:  # created meanwhile by someone else
                    raise
            else:
                if created is not None:
                    created(made)
        node = node[key]
    return node


@contextlib.contextmanager
def explained_refusal(action: str, path: str) -> Iterator[None]:
    """Turn Tiled's HTTP refusals into errors that say what to do."""
    try:
        yield
    except ClientError as error:
        code = error.response.status_code
        if code in (401, 403):
            raise TiledPermissionError(
                f"Tiled refused to {action} {path} ({error}): the client needs a valid API key "
                "with write access (TILED_API_KEY or connect(api_key=...))"
            ) from error
        if code == 405:
            raise TiledPermissionError(
                f"Tiled cannot {action} {path} ({error}): the server has no writable storage; "
                "configure writable_storage or use start_embedded_tiled()"
            ) from error
        raise


class HiddenKey(str):
    """An API key whose ``repr`` does not show it: Dask logs the arguments of a failed task."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "HiddenKey('***')"



# --------------------------------------------------------------------------- server and client


def _resolve_api_key(api_key: str | None) -> str:
    """The argument, else ``TILED_API_KEY``, else a fresh random key (32 hex digits)."""
    return api_key or os.environ.get("TILED_API_KEY") or secrets.token_hex(16)


#: (spec, media type) of a raw run's document stream (bluesky_tiled_plugins.exporters.json_seq_exporter)
BLUESKY_RUN_DOCUMENTS = ("BlueskyRun", "application/json-seq")
#: a Tiled configuration's ``media_types`` entry that serves it
BLUESKY_RUN_MEDIA_TYPES = {"BlueskyRun": {"application/json-seq": "bluesky_tiled_plugins.exporters:json_seq_exporter"}}


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
    # raw runs export as documents (BlueskyRun.documents(), databroker.v1 Header.documents()): the
    # exporter a served configuration names under media_types (phasestream up, deploy/tiled/config.yml)
    default_serialization_registry.register(*BLUESKY_RUN_DOCUMENTS, json_seq_exporter)
    server = SimpleTiledServer(directory=directory, api_key=key, port=port,
                               readable_storage=storage)
    log.info("embedded Tiled server at %s (data in %s)", public_uri(server.uri), server.directory)
    return server


def _redact(uri: str) -> str:
    """``uri`` without its ``api_key`` query parameter."""
    parts = urlsplit(uri)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "api_key"]
    return urlunsplit(parts._replace(query=urlencode(query)))


def public_uri(uri: str) -> str:
    """``uri`` fit for messages and logs: no ``api_key`` query parameter, no password."""
    parts = urlsplit(_redact(str(uri)))
    if parts.password is not None:
        netloc = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username}:***@{netloc}")
    return urlunsplit(parts)


def separate_api_key(uri: str, api_key: str | None = None) -> tuple[str, HiddenKey | None]:
    """``(uri without its api_key query, key)``: ``api_key`` when given, else the URI's, else None.

    Tiled's client sends the key in an ``Authorization`` header; a key in a URI ends up in
    request lines of the server's log. Hand the two to Dask tasks (or :func:`connect`) separately.
    """
    in_uri = dict(parse_qsl(urlsplit(uri).query)).get("api_key")
    key = api_key or in_uri
    return _redact(uri) if in_uri is not None else uri, HiddenKey(key) if key else None


_scoped_api_key: contextvars.ContextVar[str | None] = contextvars.ContextVar("phasestream_tiled_api_key",
                                                                             default=None)


@contextlib.contextmanager
def api_key_scope(api_key: str | None) -> Iterator[None]:
    """Within the block (this thread or task), :func:`connect` uses ``api_key`` when it is given none.

    For post-scan jobs, functions of a Tiled URI: the key travels beside the URI, not in it.
    """
    token = _scoped_api_key.set(api_key or None)
    try:
        yield
    finally:
        _scoped_api_key.reset(token)


#: the entry-point groups where packages register the clients of Tiled specs (BlueskyRun, ...)
_SPEC_CLIENT_GROUPS = ("tiled.special_client", "tiled.structure_client")


def structure_clients() -> OneShotCachedMap:
    """A private copy of Tiled's client classes (numpy), the spec clients loaded from their entry points.

    Tiled's clients share one class table per process, and ``BlueskyRunV3.v2`` of bluesky-tiled-plugins
    2.0.12 (which ``databroker.v1.Broker`` calls) sets ``BlueskyRun`` to the legacy ``BlueskyRunV2``
    in a shallow copy of it, i.e. in the shared table: from then on every client of the process
    reads raw runs in the legacy layout (streams without ``.base``). A client with its own table
    keeps the current layout whatever a user's session does with databroker beside it.
    """
    from importlib.metadata import entry_points

    shared = DEFAULT_STRUCTURE_CLIENT_DISPATCH["numpy"]
    private = OneShotCachedMap({name: (lambda name=name: shared[name]) for name in shared})
    for group in _SPEC_CLIENT_GROUPS:
        for entry in entry_points(group=group):
            private.set(entry.name, entry.load)
    return private


def connect(uri: str | None = None, *, api_key: str | None = None) -> Container:
    """A Tiled client for ``uri``.

    Parameters
    ----------
    uri : e.g. ``server.uri`` or ``http://host:8000/api/v1``; default the ``TILED_URI`` variable
    api_key : wins over an ``api_key`` in the URI; without both, the key of an enclosing
        :func:`api_key_scope`, else ``TILED_API_KEY``. The key always travels in a header.

    Raises
    ------
    TiledConnectionError : nothing answers at ``uri``
    TiledPermissionError : the server wants a key and none, or a wrong one, was given
    """
    uri = uri or os.environ.get("TILED_URI")
    if not uri:
        raise ValueError("no Tiled URI: pass uri= (--tiled URI), set TILED_URI, or use start_embedded_tiled()")
    uri, api_key = separate_api_key(uri, api_key)
    api_key = api_key or _scoped_api_key.get() or os.environ.get("TILED_API_KEY") or None
    try:
        httpx.get(uri, timeout=5.0, follow_redirects=True)  # fail fast instead of tiled's 45 s of retries
    except httpx.TransportError as error:
        raise TiledConnectionError(
            f"cannot reach Tiled: {type(error).__name__}: {error}. Is the server running? Check the URI (--tiled)",
            uri) from error
    try:
        return from_uri(uri, api_key=api_key, structure_clients=structure_clients())
    except RuntimeError as error:
        if "API key" not in str(error):
            raise
        raise TiledPermissionError("Tiled requires an API key: set TILED_API_KEY or pass api_key=", uri) from error
    except ClientError as error:
        if error.response.status_code not in (401, 403):
            raise
        raise TiledPermissionError(
            f"Tiled rejected the API key ({error.response.status_code} {error.response.reason_phrase}): "
            "check TILED_API_KEY or api_key=", uri) from error


def wait_for_tiled(uri: str, *, api_key: str | None = None, timeout: float | None = None,
                   first_delay: float = 1.0, max_delay: float = 30.0) -> Container:
    """A client for ``uri`` once its server answers: a service started with (or before) Tiled waits
    for it instead of exiting.

    Tries :func:`connect`; while nothing answers, logs ``waiting for Tiled at URI`` (a warning) and
    tries again after ``first_delay`` seconds, doubling up to ``max_delay``. A refused API key is
    raised at once (waiting would not help); after ``timeout`` seconds (None: no limit) the last
    :class:`TiledConnectionError` is raised.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    delay, attempt = first_delay, 0
    while True:
        attempt += 1
        try:
            client = connect(uri, api_key=api_key)
        except TiledConnectionError as error:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise
            wait = delay if left is None else min(delay, left)
            log.warning("waiting for Tiled at %s (attempt %d: %s); next try in %.0f s", public_uri(uri), attempt,
                           str(error).split(". Is the server")[0], wait)
            time.sleep(wait)
            delay = min(2 * delay, max_delay)
            continue
        if attempt > 1:
            log.warning("Tiled at %s answers after %d attempts", public_uri(uri), attempt)
        return client


def describe_tiled_error(error: BaseException) -> str | None:
    """One line for people on a Tiled connection or permission error, without secrets; None for others.

    ``"<cause> (Tiled at <uri>)"`` for :class:`TiledConnectionError`, :class:`TiledPermissionError`,
    httpx transport errors (the server went away) and 401/403 answers.
    """
    if isinstance(error, TiledConnectionError | TiledPermissionError):
        return str(error)
    try:
        where = public_uri(str(error.request.url)) if isinstance(error, httpx.HTTPError) else ""
    except RuntimeError:  # an httpx error raised without its request
        where = ""
    suffix = f" (Tiled at {where})" if where else ""
    if isinstance(error, httpx.TransportError):
        return f"cannot reach Tiled: {type(error).__name__}: {error}{suffix}"
    if isinstance(error, httpx.HTTPStatusError) and error.response.status_code in (401, 403):
        reply = error.response
        return (f"Tiled refused the request ({reply.status_code} {reply.reason_phrase}): missing or wrong API key, "
                f"or no write access; check TILED_API_KEY{suffix}")
    return None


def raw_run_writer(client: Container, *, batch_size: int = 1, normalize: bool = True) -> TiledWriter:
    """A TiledWriter that stores raw runs under ``client`` (``client[<run uid>]``): the catalog root, or a
    container such as ``client["bl/raw"]`` (then read them with ``raw="bl/raw"``).

    Subscribe it to a RunEngine (``RE.subscribe(raw_run_writer(client))``). ``batch_size=1``
    writes every event as it arrives (live use); larger batches suit bulk migration. ``normalize=False``
    skips TiledWriter's ``RunNormalizer`` (a deep copy and a schema validation of every document, and
    the conversion of Resource/Datum): only for documents composed with event-model's current schema and
    StreamResource/StreamDatum (an import), never for a RunEngine's. Multi-page TIFF files
    (``image/tiff``) are registered readably (:mod:`phasestream.store.external`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    register_consolidators()
    # every array data key as an array node: TiledWriter's default puts arrays of up to 16 elements into the
    # event table, where a 2-D image (4 x 4) fails in Arrow and the run with it (readers pair frames either way)
    if normalize:
        return TiledWriter(client, batch_size=batch_size, max_array_size=0)
    return TiledWriter(client, batch_size=batch_size, normalizer=None, max_array_size=0)


def raw_runs(client: Container, raw: str = "") -> Container:
    """The container of the raw runs: ``client[raw]`` (``bl/raw``), or ``client`` itself for ``raw=""``."""
    raw = check_raw_path(raw)
    if not raw:
        return client
    try:
        return client[raw]
    except KeyError as error:
        raise KeyError(f"no container {raw!r} of raw runs in Tiled at {public_uri(client.uri)} (--raw PATH)") from error


def raw_run_path(uid: str, raw: str = "") -> str:
    """The Tiled path of raw run ``uid`` under ``raw`` (both checked): ``bl/raw/<uid>``, or ``<uid>``."""
    return "/".join(part for part in (check_raw_path(raw), check_run_uid(uid)) if part)


def raw_run_link(client: Container, uid: str, raw: str = "") -> dict[str, str]:
    """``{path, uri}`` of raw run ``uid`` under ``raw``, for a result's ``raw`` metadata: the path from the
    catalog root and the node's URI without an API key or a password (it is stored for everyone to read)."""
    path = raw_run_path(uid, raw)
    return {"path": path, "uri": public_uri(f"{str(client.uri).rstrip('/')}/{path}")}


def open_raw_run(client: Container, uid: str, raw: str = "") -> BlueskyRun:
    """The raw run ``uid`` under ``raw`` as a databroker-2 BlueskyRun: ``run["primary"]["det_img"].read()``."""
    runs = raw_runs(client, raw)
    try:
        run = runs[check_run_uid(uid)]
    except KeyError as error:
        raise KeyError(f"no raw run {uid!r} in Tiled at {public_uri(runs.uri)}: was TiledWriter subscribed?") from error
    if not isinstance(run, BlueskyRun):
        specs = [spec.name for spec in run.specs]
        raise TypeError(f"Tiled node {uid!r} is not a BlueskyRun (specs {specs}); is it a raw run uid?")
    return run


def raw_run_complete(client: Container, uid: str, raw: str = "") -> bool:
    """True when the raw run's stop document has been written (``metadata["stop"]``)."""
    return open_raw_run(client, uid, raw).metadata.get("stop") is not None


# --------------------------------------------------------------------------- results


@contextlib.contextmanager
def tiled_session(
    uri: str | None = None,
    *,
    directory: str | Path | None = None,
    readable_storage: Sequence[str | Path] | None = None,
    wait: float | None = 0.0,
) -> Iterator[tuple[Container, str]]:
    """``(client, uri)`` for ``uri``, or for an embedded server (over ``directory`` when given) closed on exit.

    ``wait``: seconds to wait for the server at ``uri`` to answer (:func:`wait_for_tiled`; None: no
    limit, 0: fail at once).
    """
    if uri:
        yield (connect(uri) if wait == 0 else wait_for_tiled(uri, timeout=wait)), uri
        return
    server = start_embedded_tiled(directory=directory, readable_storage=readable_storage)
    try:
        yield connect(server.uri), server.uri
    finally:
        close_embedded_tiled(server)


def close_embedded_tiled(server: SimpleTiledServer) -> None:
    """``server.close()``, then remove the logging handlers the server left behind.

    SimpleTiledServer (Tiled 0.2.20) logs the ``tiled`` logger to ``error.log`` in its folder and
    leaves that FileHandler attached when it closes; once a temporary folder is removed, the next
    ``tiled`` INFO record anywhere in the process raises FileNotFoundError in the code that logged.
    """
    folder = Path(server.directory).resolve()
    try:
        server.close()
    finally:
        loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                          if isinstance(logger, logging.Logger))]
        for logger in loggers:
            for handler in list(logger.handlers):
                if isinstance(handler, logging.FileHandler) \
                        and Path(handler.baseFilename).resolve().is_relative_to(folder):
                    logger.removeHandler(handler)
                    handler.close()
