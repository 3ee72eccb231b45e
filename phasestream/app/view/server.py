"""``phasestream view``: a small web application over the results in Tiled, live.

The server follows the results container with Tiled's streaming subscriptions
(:class:`~phasestream.app.view.follow.CatalogFollower`) and pushes every change to the page over
server-sent events (``/events``); the page never talks to Tiled and never polls. Images are PNGs
rendered here (``render.py``) from the arrays, cached per run and version. The page, its script
and its style are files of this package (``static/``): nothing is loaded from outside the machine.

The Tiled API key stays in this process: it is never sent to the page, put in a URL or logged.
Every route is read-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from phasestream.app.view import render
from phasestream.app.view.arrays import NoImageError, drawn_as, strided
from phasestream.app.view.follow import CatalogFollower
from phasestream.app.view.pixel import PixelError, pixel_from_query
from phasestream.contract import RUN_UID_PATTERN, STATUSES
from phasestream.store.catalog import find
from phasestream.store.tiled import public_uri

__all__ = ["ViewServer", "allowed_hosts", "create_app", "is_loopback", "run_view", "tiled_error_response", "url_host"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
KEEPALIVE_S = 15.0
TILED_TIMEOUT_S = 20.0  # the longest a request waits for Tiled before it is answered 503


class Broadcaster:
    """Fans the follower's changes out to every open ``/events`` stream (one asyncio queue each)."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queues: set[asyncio.Queue] = set()

    def __call__(self, kind: str, payload: dict) -> None:  # called on Tiled's subscription threads
        if self.loop is None:
            return
        message = f"event: {kind}\ndata: {json.dumps(payload, allow_nan=False, default=str)}\n\n"
        for queue in list(self.queues):
            self.loop.call_soon_threadsafe(_put_latest, queue, message)


def _put_latest(queue: asyncio.Queue, message: str) -> None:
    if queue.full():  # a page that does not read: drop its oldest message rather than grow
        with contextlib.suppress(asyncio.QueueEmpty):
            queue.get_nowait()
    queue.put_nowait(message)


class MapCache:
    """The PNG images of each run's latest version, rendered from arrays read from Tiled once per version.

    Two groups, each read and rendered on its own: the phase map (``phase``, ``reliability``,
    ``ambiguous``: small) and the PCC maps (``pcc``, K times larger), so the phase map is not held up
    by the PCC maps. ``prefetch`` reads and renders a new version as soon as the update arrives
    (before the page asks for the images), so the page's requests find them ready: the phase map
    first, then the PCC maps. A running result's phase map is rendered from the arrays Tiled
    streamed to the view when they are those of the version (``CatalogFollower.streamed_maps``),
    without reading them back.
    """

    GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {"phase": ("phase", "reliability", "ambiguous"), "pcc": ("pcc",)}

    def __init__(self, follower: CatalogFollower, size: int = 32):
        self.follower, self.size = follower, size
        self._entries: dict[tuple[str, str], tuple[int, dict[str, bytes]]] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._lock = threading.Lock()
        self._prefetcher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="view-prefetch")

    def image(self, uid: str, version: int, kind: str) -> bytes | None:
        """PNG bytes of ``kind`` (``phase``, ``pcc<k>``) of version ``version`` (or newer) of run ``uid``."""
        group = "pcc" if kind.startswith("pcc") else "phase"
        key = (uid, group)
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            cached = self._entries.get(key)
            if cached is None or cached[0] < version:
                cached = (version, self._render(self._arrays(uid, version, group)))
                with self._lock:
                    self._entries[key] = cached
                    while len(self._entries) > self.size:
                        self._entries.pop(next(iter(self._entries)))
            return cached[1].get(kind)

    def _arrays(self, uid: str, version: int, group: str) -> dict:
        t0 = time.perf_counter()
        arrays = self.follower.streamed_maps(uid, version) if group == "phase" else None
        if arrays is not None:
            arrays = self._checked(uid, arrays)
        source = "streamed" if arrays is not None else "read"
        if arrays is None:
            arrays = self.follower.read_arrays(uid, self.GROUPS[group])
        log.debug("view: %s arrays of %s version %d %s in %.3f s", group, uid, version, source,
                  time.perf_counter() - t0)
        return arrays

    def _checked(self, uid: str, arrays: dict) -> dict | None:
        """Streamed arrays in the contract's dtypes, or None (read them: the checks then say why not)."""
        shape = self.follower.image_shape(uid)
        try:
            drawn = {name: drawn_as(name, array.shape, array.dtype, shape) for name, array in arrays.items()}
            return {name: strided(array, drawn[name].stride).astype(drawn[name].dtype, copy=False)
                    for name, array in arrays.items()}
        except NoImageError as error:
            log.debug("view: streamed arrays of %s not drawn: %s", uid, error)
            return None

    def prefetch(self, uid: str, version: int) -> None:
        self._prefetcher.submit(self._prefetch, uid, version)

    def _prefetch(self, uid: str, version: int) -> None:
        for kind in ("phase", "pcc0"):  # one after the other: the phase map is the one a user waits for
            try:
                self.image(uid, version, kind)
            except Exception as error:  # noqa: BLE001 - the page's own request will try again and answer
                log.debug("view: prefetching %s of %s version %d failed: %s", kind, uid, version, error)

    @staticmethod
    def _render(arrays: dict) -> dict[str, bytes]:
        """PNGs of checked arrays (``arrays.py``: the result's ``image_shape``, when known, holds each)."""
        if len({array.shape[-2:] for array in arrays.values()}) > 1:
            raise NoImageError("the map arrays differ in image shape: "
                               + ", ".join(f"{name} {array.shape}" for name, array in arrays.items()))
        images = {}
        if {"phase", "reliability"} <= arrays.keys():
            images["phase"] = render.phase_png(arrays["phase"], arrays["reliability"], arrays.get("ambiguous"))
        for k, pcc in enumerate(arrays.get("pcc", ())):
            images[f"pcc{k}"] = render.pcc_png(pcc)
        return images


LOOPBACK_NAMES = ("127.0.0.1", "localhost")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address to listen on) is this machine only: ``localhost``, 127.0.0.0/8, ``::1``
    (bracketed or not), an IPv4-mapped loopback address."""
    name = host.strip().lower().removeprefix("[").removesuffix("]")
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _host_name(host: str) -> str:
    """``host`` as a ``Host`` header names it (what ``TrustedHostMiddleware`` compares, the port left off):
    lower case, an IPv6 address in brackets."""
    name = host.strip().lower().removeprefix("[").removesuffix("]")
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return name
    return f"[{address.compressed}]" if address.version == 6 else address.compressed


def allowed_hosts(host: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The ``Host`` headers the view answers when it listens on ``host``: on loopback (:func:`is_loopback`,
    ``::1`` too) only the loopback names and the address it listens on, so that a web page whose name was
    rebound to a loopback address (DNS rebinding) cannot read the results through the visitor's browser;
    anything when it listens elsewhere (``--public``: the names it is reached by are not known here)."""
    if not is_loopback(host):
        return ["*"]
    own = _host_name(host)
    return [*LOOPBACK_NAMES, *([own] if own not in LOOPBACK_NAMES else []), *extra]


def url_host(host: str) -> str:
    """``host`` as it goes in a URL: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class TiledTimeoutError(TimeoutError):
    """Tiled did not answer a request of the view in time."""


def tiled_error_response(error: BaseException) -> JSONResponse | None:
    """The answer to a request that failed in Tiled (a transport error, a timeout, an error status):
    503 (Tiled unreachable or not answering) or 502 (Tiled answered an error), ``{"error": "..."}`` naming
    the problem (the exception's type and status, never its text: that may quote a URL or a header);
    None for any other error."""
    if isinstance(error, TiledTimeoutError):
        message, status = str(error), 503
    elif isinstance(error, httpx.TimeoutException):
        message, status = f"Tiled did not answer in time ({type(error).__name__})", 503
    elif isinstance(error, httpx.HTTPStatusError):
        response = error.response
        message, status = f"Tiled answered {response.status_code} {response.reason_phrase}".rstrip(), 502
    elif isinstance(error, httpx.TransportError):
        message, status = f"cannot reach Tiled ({type(error).__name__})", 503
    else:
        return None
    log.warning("view: %s", message)
    return JSONResponse({"error": message}, status_code=status)


def create_app(follower: CatalogFollower, *, hosts: list[str] | None = None,
               tiled_timeout: float = TILED_TIMEOUT_S) -> Starlette:
    """The view's ASGI application over a started (or to be started) ``follower``, answering requests whose
    ``Host`` is one of ``hosts`` (default: the loopback names, :func:`allowed_hosts`). A request that reads
    Tiled (search, images) waits for it at most ``tiled_timeout`` seconds (then 503, :func:`tiled_error_response`)."""
    broadcaster = Broadcaster()
    cache = MapCache(follower)
    tiled_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="view-tiled")  # bounded, as is the wait

    async def from_tiled(function) -> Any:
        """``function()`` (which reads Tiled) on ``tiled_pool``; TiledTimeoutError after ``tiled_timeout`` s (the
        read goes on, bounded by the Tiled client's own timeouts, and its thread with it)."""
        try:
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(tiled_pool, function),
                                          tiled_timeout)
        except TimeoutError:
            raise TiledTimeoutError(f"Tiled did not answer within {tiled_timeout:g} s") from None
    follower.add_listener(broadcaster)
    drawn_versions: dict[str, int] = {}

    def prefetch(kind: str, payload: dict) -> None:
        """A run's maps changed: render them now, while the update travels to the pages."""
        if (kind == "run" and broadcaster.queues and payload["maps_energies"]
                and payload["version"] != drawn_versions.get(payload["uid"])):
            drawn_versions[payload["uid"]] = payload["version"]
            cache.prefetch(payload["uid"], payload["version"])

    follower.add_listener(prefetch)

    def run_or_404(request: Request) -> tuple[str, dict] | Response:
        uid = request.path_params["uid"]
        if RUN_UID_PATTERN.fullmatch(uid) is None:
            return Response("not a run uid", status_code=404)
        summary = follower.summary(uid)
        if summary is None:
            return Response(f"no result {uid}", status_code=404)
        return uid, summary

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def state(request: Request) -> Response:
        return JSONResponse({"state": follower.state, "root": follower.root, "tiled": public_uri(follower.tiled_base),
                             "phase_colors": render.phase_colors_hex(), "statuses": list(STATUSES),
                             "runs": follower.summaries()})

    async def healthz(request: Request) -> Response:
        """200 while the view follows Tiled live; 503 while it (re)connects (``phasestream status``)."""
        live = follower.state == "live"
        return JSONResponse({"ok": live, "state": follower.state}, status_code=200 if live else 503)

    async def search(request: Request) -> Response:
        """The uids ``phasestream query`` would list for ``soc``, ``tolerance`` and ``status``."""
        params = request.query_params
        try:
            soc = float(params["soc"]) if params.get("soc") else None
            tolerance = float(params.get("tolerance") or 0.0)
            status = params.get("status") or None
            found = await from_tiled(lambda: find(follower.client, state_of_charge=soc, tolerance=tolerance,
                                                  status=status, root=follower.root))
        except (ValueError, TypeError) as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        except Exception as error:
            reply = tiled_error_response(error)
            if reply is None:
                raise
            return reply
        return JSONResponse({"uids": sorted(found)})

    def run(request: Request) -> Response:
        found = run_or_404(request)
        return found if isinstance(found, Response) else JSONResponse(found[1])

    async def image(request: Request) -> Response:
        found = run_or_404(request)
        if isinstance(found, Response):
            return found
        uid, summary = found
        kind = request.path_params["kind"]

        def draw() -> bytes | None:
            if kind == "od":
                plane = follower.read_od_plane(uid, summary["energies_seen"] - 1)
                return None if plane is None else render.od_png(plane)
            return cache.image(uid, summary["version"], kind)

        try:
            body = await from_tiled(draw)
        except KeyError:
            body = None
        except NoImageError as error:  # arrays off the contract (arrays.py): said, never drawn
            return Response(f"no image: {error}", status_code=422)
        except Exception as error:
            reply = tiled_error_response(error)
            if reply is None:
                raise
            return reply
        if body is None:
            return Response(f"no {kind} image for {uid} yet", status_code=404)
        # the URL names the version (?v=...), so a version's image never changes
        return Response(body, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    async def pixel(request: Request) -> Response:
        """The pixel ``?y=&x=`` of a result: its OD spectrum, the maps there and the fitted references (pixel.py)."""
        found = run_or_404(request)
        if isinstance(found, Response):
            return found
        uid = found[0]
        try:
            y, x = pixel_from_query(request.query_params, follower.image_shape(uid))
            body = await from_tiled(lambda: follower.pixel(uid, y, x))
        except KeyError:
            return Response(f"no result {uid}", status_code=404)
        except (PixelError, NoImageError, ValueError) as error:
            return JSONResponse({"error": str(error)}, status_code=400 if isinstance(error, PixelError) else 422)
        except Exception as error:
            reply = tiled_error_response(error)
            if reply is None:
                raise
            return reply
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def events(request: Request) -> Response:
        queue: asyncio.Queue = asyncio.Queue(maxsize=1000)
        broadcaster.loop = asyncio.get_running_loop()
        broadcaster.queues.add(queue)

        async def stream() -> AsyncIterator[str]:
            try:
                first = {"state": follower.state, "runs": follower.summaries()}
                yield f"event: snapshot\ndata: {json.dumps(first, allow_nan=False, default=str)}\n\n"
                while True:
                    try:
                        yield await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
            finally:
                broadcaster.queues.discard(queue)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        broadcaster.loop = asyncio.get_running_loop()
        if follower._thread is None:
            follower.start()
        try:
            yield
        finally:
            follower.remove_listener(broadcaster)

    routes = [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/api/state", state),
        Route("/api/search", search),
        Route("/api/runs/{uid}", run),
        Route("/api/runs/{uid}/{kind}.png", image),
        Route("/api/runs/{uid}/pixel", pixel),
        Route("/events", events),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan, middleware=[
        Middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_NAMES) if hosts is None else hosts)])


def run_view(tiled: str | object, *, host: str = "127.0.0.1", port: int = 8010, root: str = "phasestream",
             api_key: str | None = None, ready=None, extra_hosts: list[str] | tuple[str, ...] = (),
             tiled_timeout: float = TILED_TIMEOUT_S) -> None:
    """Serve the view until interrupted (SIGINT/SIGTERM).

    Parameters
    ----------
    tiled : a Tiled URI (its key, if any, moves to a header) or an open Tiled client
    host, port : where the view listens (127.0.0.1 by default: see docs/security.md for ``--public``)
    root : the results container
    api_key : Tiled API key; default ``TILED_API_KEY``
    ready : called with the bound ``(host, port)`` once the view serves
    extra_hosts : ``Host`` names answered besides the loopback names (:func:`allowed_hosts`)
    tiled_timeout : seconds a request waits for Tiled before it is answered 503
    """
    import uvicorn

    if isinstance(tiled, str):
        follower = CatalogFollower(tiled, api_key=api_key, root=root)
    else:
        follower = CatalogFollower(str(tiled.uri), root=root, client=tiled)
    app = create_app(follower, hosts=allowed_hosts(host, extra_hosts), tiled_timeout=tiled_timeout)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    if ready is not None:
        original = server.startup

        async def startup(sockets=None) -> None:
            await original(sockets)
            bound = server.servers[0].sockets[0].getsockname() if server.servers else (host, port)
            ready(bound[0], bound[1])

        server.startup = startup
    try:
        server.run()
    finally:
        follower.close()


class ViewServer:
    """The view served on a thread of this process (tests, benchmarks, the demo): ``.url``, ``.close()``.

    ``tiled``, ``tiled_timeout`` as for :func:`run_view`; port 0 picks a free port.
    """

    def __init__(self, tiled: str | object, *, host: str = "127.0.0.1", port: int = 0, root: str = "phasestream",
                 api_key: str | None = None, timeout: float = 30.0, tiled_timeout: float = TILED_TIMEOUT_S):
        import uvicorn

        if isinstance(tiled, str):
            self.follower = CatalogFollower(tiled, api_key=api_key, root=root)
        else:
            self.follower = CatalogFollower(str(tiled.uri), root=root, client=tiled)
        app = create_app(self.follower, hosts=allowed_hosts(host), tiled_timeout=tiled_timeout)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                access_log=False, lifespan="on")
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # not the main thread
        self._thread = threading.Thread(target=self._server.run, name="view-server", daemon=True)
        self._thread.start()
        deadline = timeout
        while not self._server.started:
            if not self._thread.is_alive() or deadline <= 0:
                self._server.should_exit = True
                self.follower.close()  # started by the app's lifespan, before uvicorn binds
                raise RuntimeError(f"the view did not start on {host}:{port}")
            deadline -= 0.05
            threading.Event().wait(0.05)
        bound = self._server.servers[0].sockets[0].getsockname()
        self.url = f"http://{url_host(bound[0])}:{bound[1]}"

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self.follower.close()

    def __enter__(self) -> ViewServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
