"""The model server: pretrained models loaded once, served over pyzmq with msgpack.

``phasestream serve-models [--bind tcp://127.0.0.1:5579]`` runs :class:`ModelServer` in its own
process; analysis callbacks and post-scan jobs talk to it with :class:`ModelClient` and never import
TensorFlow themselves.

Wire format (DESIGN.md "Wire formats"): the server is a ROUTER; clients are DEALER (or REQ)
sockets sending one msgpack frame per request (arrays in the ``msgpack_numpy`` layout, never pickle)::

    request  {op: "health"|"list"|"encode"|"decode"|"enhance", model: str, version: str (optional),
              array: ndarray, options: {}, id: any (optional, echoed)}
    reply    {ok: bool, model, version, sha256, array (when any), error: str (when not ok), id}

``encode`` takes spectra (N, E) at the model's energies and replies with latent means (N, D) in
``array`` (and the mixture-component probabilities (N, K) in ``components`` with
``options: {components: true}``); ``decode`` takes latent points (N, D) and replies with normalized
spectra (N, E); ``enhance`` (InDI models) takes a low-quality image (Y, X) or images (N, Y, X) and
replies with the enhanced, ``scale``-times larger image(s) (``options: {steps: N}``, default the
model's). ``list`` replies ``models``: the artifacts' summaries; ``health`` replies ``status``,
``loaded`` models, ``uptime_s``, ``pid`` and ``stats`` (request, batch and item counters).

Arrays are validated after conversion to float32, the dtype the models compute in: a float64 value
beyond float32's range (1e308) is refused, not passed on as infinity. Every failure is a reply with
``ok: false`` (unknown model or version, input not matching the model's energies, non-finite values,
an array larger than ``max_request_bytes`` as float32, malformed or undecodable message, payload over
``max_request_bytes``); error texts are cut to ``MAX_ERROR_CHARS``, and neither arrays nor requests
are logged. The server keeps serving. Requests that arrive together for the same model and op are run
as one batch; when a batch fails inside the model, each of its requests is run again on its own, so a
request the model cannot take fails alone. SIGTERM (or :meth:`ModelServer.stop`) ends the loop after
the current batch.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from phasestream.models.registry import ArtifactError, ModelNotFoundError, ModelRegistry
from phasestream.services.process import ServiceProcess
from phasestream.services.wire import WireFormatError, deserialize, serialize

__all__ = ["DEFAULT_MODEL_ADDRESS", "OPS", "EncodeResult", "ModelClient", "ModelServer", "ModelServerConfig",
           "ModelServerError", "ModelServerProcess", "ModelServerUnavailable", "main"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ADDRESS = "tcp://127.0.0.1:5579"
OPS = ("health", "list", "encode", "decode", "enhance")
MODEL_OPS = {"gmvae": ("encode", "decode"), "indi": ("enhance",)}
# what GMVAE.encode/decode and indi.enhance_image cast their input to: requests are checked in it
MODEL_DTYPE = np.dtype(np.float32)
MAX_ERROR_CHARS = 1000


class ModelServerError(RuntimeError):
    """The model server replied ``ok: false``; the message is the server's error."""


class ModelServerUnavailable(ConnectionError):
    """No reply from the model server within the timeout, after every retry."""


class _RequestError(ValueError):
    """A request the server refuses (turned into an ``ok: false`` reply)."""


@dataclass
class ModelServerConfig:
    """Settings of a model server (validated by :meth:`validate`).

    bind : 0MQ address to bind; ``tcp://127.0.0.1:*`` picks a free port
    max_request_bytes : larger requests get an error reply without being decoded
    max_batch_requests : requests taken from the socket per batch
    folders : artifact folders (default: the packaged pretrained folder and ``PHASESTREAM_MODELS``)
    preload : ``name`` or ``name:version`` of models to load at start-up
    """

    bind: str = DEFAULT_MODEL_ADDRESS
    max_request_bytes: int = 256 << 20
    max_batch_requests: int = 64
    folders: list[str] | None = None
    preload: list[str] = field(default_factory=list)

    def validate(self) -> ModelServerConfig:
        if not self.bind.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"bind must be a 0MQ address like tcp://127.0.0.1:5579, got {self.bind!r}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")
        if self.max_batch_requests < 1:
            raise ValueError("max_batch_requests must be >= 1")
        return self


@dataclass
class _Loaded:
    artifact: Any
    model: Any

    @property
    def info(self) -> dict[str, Any]:
        return {"model": self.artifact.name, "version": self.artifact.version, "sha256": self.artifact.sha256}


@dataclass
class _Request:
    envelope: list[bytes]
    message: dict[str, Any]
    reply: dict[str, Any] | None = None


class ModelServer:
    """Serves the registry's models on a ROUTER socket (see the module docstring for the protocol)."""

    def __init__(self, config: ModelServerConfig | None = None, *, registry: ModelRegistry | None = None,
                 context: zmq.Context | None = None):
        self.config = (config or ModelServerConfig()).validate()
        self.registry = registry or ModelRegistry(self.config.folders)
        self._context = context or zmq.Context.instance()
        self._models: dict[tuple[str, str], _Loaded] = {}
        self._stopping = threading.Event()
        self._started = time.monotonic()
        self.address: str | None = None
        self.socket: zmq.Socket | None = None
        self.stats = defaultdict(int)

    # ------------------------------------------------------------------ lifecycle

    def bind(self) -> str:
        """Bind the socket and load the preloaded models; returns the bound address."""
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # hard cap protecting memory; requests between the configured limit and this get an error reply
        limit = self.config.max_request_bytes
        sock.setsockopt(zmq.MAXMSGSIZE, max(4 * limit, limit + (64 << 20)))
        sock.bind(self.config.bind)
        self.socket = sock
        self.address = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        for spec in self.config.preload:
            name, _, version = spec.partition(":")
            self._model(name, version or None)
        logger.info("model server on %s", self.address)
        return self.address

    def stop(self) -> None:
        """Ask the serving loop to end (safe from a signal handler or another thread)."""
        self._stopping.set()

    def serve(self) -> dict[str, int]:
        """Serve until :meth:`stop`; returns request counters."""
        if self.socket is None:
            self.bind()
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                if not dict(poller.poll(200)):
                    continue
                batch = []
                for _ in range(self.config.max_batch_requests):
                    try:
                        batch.append(self.socket.recv_multipart(zmq.NOBLOCK, copy=False))
                    except zmq.Again:
                        break
                self._handle_batch(batch)
        finally:
            self.socket.close(linger=0)
            self.socket = None
        return dict(self.stats)

    # ------------------------------------------------------------------ requests

    def _handle_batch(self, frames_list: list[list[zmq.Frame]]) -> None:
        requests: list[_Request] = []
        for frames in frames_list:
            envelope = [f.bytes for f in frames[:-1]]
            payload = frames[-1].buffer
            self.stats["requests"] += 1
            req = _Request(envelope, {})
            try:
                req.message = self._parse(payload)
                self._validate(req.message)
            except _RequestError as exc:
                req.reply = self._error(str(exc))
            requests.append(req)
        groups: dict[tuple, list[_Request]] = defaultdict(list)
        for req in requests:
            if req.reply is not None:
                continue
            op = req.message["op"]
            if op in ("health", "list"):
                req.reply = self._health() if op == "health" else self._list()
            else:
                groups[(op, req.message["model"], req.message.get("version"))].append(req)
        for (op, name, version), reqs in groups.items():
            self._run_group(op, name, version, reqs)
        for req in requests:
            reply = req.reply
            if isinstance(req.message.get("id"), str | int):
                reply["id"] = req.message["id"]
            self.stats["errors" if not reply["ok"] else "ok"] += 1
            try:
                data = serialize(reply)
            except TypeError as exc:  # never expected; still answer
                data = serialize(self._error(f"reply could not be encoded: {exc}"))
            self.socket.send_multipart([*req.envelope, data], copy=False)

    def _parse(self, payload: memoryview) -> dict[str, Any]:
        size = payload.nbytes
        if size > self.config.max_request_bytes:
            raise _RequestError(f"request of {size} bytes exceeds the server's limit of "
                                f"{self.config.max_request_bytes} bytes: send fewer spectra per request")
        try:
            message = deserialize(payload, max_message_size=self.config.max_request_bytes)
        except WireFormatError as exc:
            raise _RequestError(f"malformed request: {exc}") from None
        if not isinstance(message, dict):
            raise _RequestError(f"malformed request: expected a map, got {type(message).__name__}")
        return message

    @staticmethod
    def _validate(message: dict[str, Any]) -> None:
        op = message.get("op")
        if op not in OPS:
            raise _RequestError(f"malformed request: op must be one of {list(OPS)}, got {op!r}")
        if op in ("encode", "decode", "enhance"):
            if not isinstance(message.get("model"), str) or not message["model"]:
                raise _RequestError(f"malformed request: op {op!r} needs a model name")
            if message.get("version") is not None and not isinstance(message["version"], str):
                raise _RequestError("malformed request: version must be a string")
            if not isinstance(message.get("array"), np.ndarray):
                raise _RequestError(f"malformed request: op {op!r} needs an array")
        if not isinstance(message.get("options", {}), dict):
            raise _RequestError("malformed request: options must be a map")

    @staticmethod
    def _error(message: str, **info: Any) -> dict[str, Any]:
        return {"ok": False, "error": _truncated(message), "model": info.get("model"),
                "version": info.get("version"), "sha256": info.get("sha256")}

    def _health(self) -> dict[str, Any]:
        return {"ok": True, "status": "serving", "model": None, "version": None, "sha256": None,
                "loaded": [f"{n}:{v}" for n, v in self._models], "uptime_s": time.monotonic() - self._started,
                "pid": os.getpid(), "stats": dict(self.stats)}

    def _list(self) -> dict[str, Any]:
        return {"ok": True, "model": None, "version": None, "sha256": None,
                "models": [a.summary() for a in self.registry.artifacts()]}

    def _model(self, name: str, version: str | None) -> _Loaded:
        artifact = self.registry.get(name, version)
        key = (artifact.name, artifact.version)
        if key not in self._models:
            t0 = time.perf_counter()
            self._models[key] = _Loaded(artifact, artifact.load())
            logger.info("loaded %s %s in %.1f s", *key, time.perf_counter() - t0)
        return self._models[key]

    def _run_group(self, op: str, name: str, version: str | None, reqs: list[_Request]) -> None:
        try:
            loaded = self._model(name, version)
        except (ModelNotFoundError, ArtifactError) as exc:
            for req in reqs:
                req.reply = self._error(str(exc), model=name, version=version)
            return
        kind = loaded.artifact.kind
        if op not in MODEL_OPS.get(kind, ()):
            for req in reqs:
                req.reply = self._error(f"model {name!r} is a {kind} model: it supports "
                                        f"{list(MODEL_OPS.get(kind, ()))}, not {op!r}", **loaded.info)
            return
        valid: list[tuple[_Request, np.ndarray]] = []
        for req in reqs:
            try:
                valid.append((req, self._check_input(op, loaded, req.message["array"])))
            except _RequestError as exc:
                req.reply = self._error(str(exc), **loaded.info)
        if not valid:
            return
        if op == "enhance":
            self._enhance(loaded, valid)
        else:
            self._run_batch(op, loaded, valid)

    def _run_batch(self, op: str, loaded: _Loaded, valid: list[tuple[_Request, np.ndarray]]) -> None:
        """``encode``/``decode`` of validated requests as one batch; if the model raises, each request
        again on its own, so that a request the model cannot take fails alone."""
        try:
            outputs = self._infer(op, loaded, [a for _, a in valid])
        except Exception as exc:  # noqa: BLE001 - a failure inside the model must not end the server
            if len(valid) > 1:
                logger.warning("%s batch of %d requests with %s %s failed (%s); running them one by one", op,
                               len(valid), loaded.artifact.name, loaded.artifact.version, type(exc).__name__)
                for pair in valid:
                    self._run_batch(op, loaded, [pair])
                return
            req = valid[0][0]
            req.reply = self._inference_error(op, loaded, exc)
            return
        for (req, _), output in zip(valid, outputs, strict=True):
            reply = {"ok": True, **loaded.info, "array": output["array"]}
            if op == "encode" and req.message.get("options", {}).get("components"):
                reply["components"] = output["components"]
            req.reply = reply

    def _infer(self, op: str, loaded: _Loaded, arrays: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """The model's outputs for each of ``arrays``, computed as one batch."""
        sizes = list(itertools.accumulate(len(a) for a in arrays))
        joined = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        if op == "encode":
            latent, components = loaded.model.encode(joined)
            outputs = {"array": latent, "components": components}
        else:
            outputs = {"array": loaded.model.decode(joined)}
        self.stats["batches"] += 1
        self.stats["items"] += len(joined)
        return [{key: np.ascontiguousarray(value[start:end]) for key, value in outputs.items()}
                for start, end in zip([0, *sizes[:-1]], sizes, strict=True)]

    def _inference_error(self, op: str, loaded: _Loaded, exc: Exception) -> dict[str, Any]:
        """The reply to a request that failed inside the model; logged without the request or a traceback
        (an exception's text can quote the input), the traceback only at DEBUG level."""
        name, version = loaded.artifact.name, loaded.artifact.version
        text = f"{op} failed in model {name!r} {version}: {type(exc).__name__}: {exc}"
        logger.error("%s", _truncated(text, 300))
        logger.debug("%s with %s %s failed", op, name, version, exc_info=True)
        return self._error(text, **loaded.info)

    def _enhance(self, loaded: _Loaded, valid: list[tuple[_Request, np.ndarray]]) -> None:
        """InDI: each request's image (Y, X) or images (N, Y, X), one at a time (sizes differ)."""
        from phasestream.models.indi import enhance_image

        art = loaded.artifact
        for req, array in valid:
            options = req.message.get("options", {})
            steps = options.get("steps", art.manifest.get("steps", 8))
            if not isinstance(steps, int) or not 1 <= steps <= 100:
                req.reply = self._error(f"options.steps must be an integer in 1..100, got {steps!r}", **loaded.info)
                continue
            try:
                images = array[None] if array.ndim == 2 else array
                out = np.stack([enhance_image(loaded.model, im, steps=steps, scale=int(art.manifest.get("scale", 2)))
                                for im in images])
            except Exception as exc:  # noqa: BLE001 - nor one in enhancing an image
                req.reply = self._inference_error("enhance", loaded, exc)
                continue
            self.stats["items"] += len(images)
            req.reply = {"ok": True, **loaded.info, "steps": steps, "array": out[0] if array.ndim == 2 else out}

    def _check_input(self, op: str, loaded: _Loaded, array: np.ndarray) -> np.ndarray:
        """The request's array as :data:`MODEL_DTYPE`, checked in that dtype (shape, size, finite values)."""
        model, art = loaded.model, loaded.artifact
        if array.dtype.kind not in "fiu":
            raise _RequestError(f"array must be numeric, got dtype {array.dtype}")
        if op == "enhance":
            if array.ndim not in (2, 3) or min(array.shape[-2:]) < 8 or array.size == 0:
                raise _RequestError(f"model {art.name} {art.version} enhances an image (Y, X) or images (N, Y, X) "
                                    f"of at least 8 x 8 pixels; got shape {list(array.shape)}")
        elif op == "encode":
            n = model.n_energies
            if array.ndim != 2 or array.shape[1] != n:
                energies = ", ".join(f"{e:g}" for e in art.energies)
                raise _RequestError(f"model {art.name} {art.version} takes spectra of {n} energies ({energies} eV) "
                                    f"as an (N, {n}) array; got shape {list(array.shape)}")
        else:
            d = model.latent_dim
            if array.ndim != 2 or array.shape[1] != d:
                raise _RequestError(f"model {art.name} {art.version} decodes latent points as an (N, {d}) array; "
                                    f"got shape {list(array.shape)}")
        converted_bytes = array.size * MODEL_DTYPE.itemsize
        if converted_bytes > self.config.max_request_bytes:  # uint8 grows 4 times as float32
            raise _RequestError(f"array of shape {list(array.shape)} and dtype {array.dtype} is {converted_bytes} "
                                f"bytes as {MODEL_DTYPE}, over the server's limit of {self.config.max_request_bytes} "
                                "bytes: send fewer spectra or images per request")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked just below
            x = array.astype(MODEL_DTYPE, copy=False)
        finite = np.isfinite(x)
        if finite.all():
            return x
        if array.dtype.itemsize > MODEL_DTYPE.itemsize and (np.isfinite(array) & ~finite).any():
            raise _RequestError(f"array has non-finite values after conversion to {MODEL_DTYPE} ({array.dtype} "
                                f"values beyond {MODEL_DTYPE} range, max {np.finfo(MODEL_DTYPE).max:.4g}?)")
        if op != "enhance":
            raise _RequestError("array contains NaN or infinite values: send particle pixels only")
        if not finite.any():  # enhance_image fills NaN pixels with the image's median
            raise _RequestError("the image has no finite pixel")
        return x


def _truncated(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` cut to ``limit`` characters (an error must not carry a huge repr back or into the log)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


# ---------------------------------------------------------------------------------------------- client


@dataclass
class EncodeResult:
    """Latent means (N, D), component probabilities (N, K) or None, and the model that made them."""

    latent: np.ndarray
    components: np.ndarray | None
    model: str
    version: str
    sha256: str


class ModelClient:
    """Client of the model server (DEALER socket, timeouts and retries).

    Parameters
    ----------
    address : the server's address
    timeout : seconds to wait for each reply
    retries : further attempts after a timeout (the socket is recreated each time)
    max_spectra : spectra per ``encode`` request; larger inputs are sent in chunks
    """

    def __init__(self, address: str = DEFAULT_MODEL_ADDRESS, *, timeout: float = 30.0, retries: int = 2,
                 max_spectra: int = 131072, context: zmq.Context | None = None):
        if timeout <= 0 or retries < 0:
            raise ValueError("timeout must be > 0 and retries >= 0")
        self.address, self.timeout, self.retries, self.max_spectra = address, timeout, retries, int(max_spectra)
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._lock = threading.Lock()

    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.address)
            self._socket = sock
        return self._socket

    def _reset(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def request(self, op: str, *, model: str | None = None, version: str | None = None,
                array: np.ndarray | None = None, options: dict | None = None, timeout: float | None = None) -> dict:
        """Send one request and return the reply; raises :class:`ModelServerError` when ``ok`` is false."""
        message: dict[str, Any] = {"op": op, "id": uuid.uuid4().hex}
        if model is not None:
            message["model"] = model
        if version is not None:
            message["version"] = version
        if array is not None:
            message["array"] = np.ascontiguousarray(array)
        if options:
            message["options"] = options
        payload = serialize(message)
        wait_ms = int(1000 * (timeout or self.timeout))
        with self._lock:
            for attempt in range(self.retries + 1):
                sock = self._connect()
                sock.send(payload, copy=False)
                deadline = time.monotonic() + wait_ms / 1000
                while (left := deadline - time.monotonic()) > 0:
                    if not sock.poll(int(1000 * left) + 1, zmq.POLLIN):
                        break
                    reply = deserialize(sock.recv(copy=False).buffer)
                    # no id: the server could not read our request (too large, undecodable)
                    if isinstance(reply, dict) and reply.get("id") in (message["id"], None):
                        if not reply.get("ok"):
                            raise ModelServerError(reply.get("error") or "model server error")
                        return reply
                    # a late reply to an earlier attempt: ignore it
                logger.warning("no reply from the model server at %s (attempt %d of %d)", self.address, attempt + 1,
                               self.retries + 1)
                self._reset()
        raise ModelServerUnavailable(f"no reply from the model server at {self.address} within "
                                     f"{wait_ms / 1000:g} s ({self.retries + 1} attempts): is `phasestream "
                                     "serve-models` running there?")

    def health(self, timeout: float | None = None) -> dict:
        return self.request("health", timeout=timeout)

    def list_models(self, timeout: float | None = None) -> list[dict]:
        return self.request("list", timeout=timeout)["models"]

    def encode(self, model: str, spectra: np.ndarray, *, version: str | None = None,
               components: bool = False) -> EncodeResult:
        """Latent means of spectra (N, E), sent in chunks of ``max_spectra``; one model version throughout."""
        spectra = np.asarray(spectra, dtype=np.float32)
        if spectra.ndim != 2:
            raise ValueError(f"spectra must be (N, E), got shape {spectra.shape}")
        latents, comps, info = [], [], None
        for start in range(0, max(len(spectra), 1), self.max_spectra):
            reply = self.request("encode", model=model, version=version, array=spectra[start:start + self.max_spectra],
                                 options={"components": True} if components else None)
            if info is None:
                info = reply
                version = reply["version"]  # later chunks use the same version
            latents.append(reply["array"])
            if components:
                comps.append(reply["components"])
        return EncodeResult(np.concatenate(latents), np.concatenate(comps) if components else None,
                            info["model"], info["version"], info["sha256"])

    def enhance(self, model: str, images: np.ndarray, *, version: str | None = None, steps: int | None = None,
                timeout: float | None = None) -> dict:
        """InDI-enhanced image(s): the reply (``array`` (Y*s, X*s) or (N, Y*s, X*s), ``steps``, model info)."""
        return self.request("enhance", model=model, version=version, array=np.asarray(images, np.float32),
                            options={"steps": int(steps)} if steps is not None else None, timeout=timeout)

    def decode(self, model: str, latent: np.ndarray, *, version: str | None = None) -> np.ndarray:
        return self.request("decode", model=model, version=version, array=np.asarray(latent, np.float32))["array"]

    def close(self) -> None:
        with self._lock:
            self._reset()

    def __enter__(self) -> ModelClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- process


class ModelServerProcess(ServiceProcess):
    """``phasestream serve-models`` in a subprocess (demo, tests); ``address`` once started."""

    def __init__(self, bind: str = "tcp://127.0.0.1:*", *, args: tuple[str, ...] = (), timeout: float = 120.0,
                 env: dict[str, str] | None = None):
        super().__init__(("serve-models", "--bind", bind, *args), env=env, timeout=timeout, what="model server")

    @property
    def address(self) -> str | None:
        """The bound address (``tcp://127.0.0.1:PORT``) once started."""
        return self.ready.get("address")


def serve_models(config: ModelServerConfig) -> int:
    """Run a model server in this process until SIGTERM/SIGINT; prints a ``ready`` JSON line first."""
    server = ModelServer(config)
    address = server.bind()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    models = [f"{a.name}:{a.version}" for a in server.registry.artifacts()]
    print(json.dumps({"ready": True, "address": address, "models": models}), flush=True)
    stats = server.serve()
    print(json.dumps({"stopped": True, "stats": stats}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phasestream serve-models")
    add_arguments(parser)
    return serve_models(config_from_args(parser.parse_args(argv)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve-models`` options (shared with the ``phasestream`` CLI)."""
    parser.add_argument("--bind", default=DEFAULT_MODEL_ADDRESS,
                        help=f"0MQ address to bind (default {DEFAULT_MODEL_ADDRESS}; tcp://127.0.0.1:* picks a port)")
    parser.add_argument("--models-dir", action="append", default=None, metavar="DIR",
                        help="artifact folder (repeatable; default: packaged models and $PHASESTREAM_MODELS)")
    parser.add_argument("--max-request-mb", type=float, default=256.0, help="largest request accepted (MB)")
    parser.add_argument("--preload", nargs="*", default=[], metavar="NAME[:VERSION]",
                        help="models to load at start-up")


def config_from_args(args: argparse.Namespace) -> ModelServerConfig:
    folders = None
    if args.models_dir:
        from phasestream.models.registry import PRETRAINED_DIR

        folders = [str(PRETRAINED_DIR), *args.models_dir]
    return ModelServerConfig(bind=args.bind, max_request_bytes=int(args.max_request_mb * (1 << 20)),
                             folders=folders, preload=list(args.preload)).validate()


if __name__ == "__main__":
    sys.exit(main())
