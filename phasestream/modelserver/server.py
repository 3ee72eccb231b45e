"""The model server: pretrained models loaded once, served over pyzmq with msgpack.

``phasestream serve-models [--bind tcp://127.0.0.1:5579]`` runs :class:`ModelServer` in its own
process; analysis callbacks and post-scan jobs talk to it with
:class:`~phasestream.modelserver.client.ModelClient` and never import TensorFlow themselves. The
protocol, its validation rules and its errors: :mod:`phasestream.modelserver.protocol`.

Requests that arrive together for the same model and op are run as one batch; when a batch fails
inside the model, each of its requests is run again on its own, so a request the model cannot take
fails alone. SIGTERM (or :meth:`ModelServer.stop`) ends the loop after the current batch.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from phasestream.models.domain import DOMAINS, DomainMismatchError, ModelRefusedError, check_domain, check_gain
from phasestream.models.registry import ArtifactError, ModelNotFoundError, ModelRegistry
from phasestream.modelserver.protocol import (
    DEFAULT_MODEL_ADDRESS,
    MODEL_DTYPE,
    MODEL_OPS,
    OPS,
    truncated,
)
from phasestream.transport.wire import WireFormatError, deserialize, serialize

__all__ = ["ModelServer", "ModelServerConfig", "add_arguments", "config_from_args", "serve_models"]


logger = logging.getLogger(__name__)

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


RECEIVE_QUEUE_PER_CONNECTION = 4


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
        # a client waits for each reply (ModelClient), so a few queued requests per connection are plenty; ZeroMQ's
        # default of 1000 let one connection queue 1000 requests of up to MAXMSGSIZE each in this process
        sock.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE_PER_CONNECTION)
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
                try:
                    self._handle_batch(batch)
                except Exception as exc:  # never expected (each failure is a reply): keep serving
                    logger.error("a batch of %d requests could not be handled: %s", len(batch), type(exc).__name__)
                    logger.debug("the batch's failure", exc_info=True)
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
            except Exception as exc:  # noqa: BLE001 - a request no check foresaw fails alone
                req.reply = self._error(f"malformed request: {type(exc).__name__}")
            requests.append(req)
        groups: dict[tuple, list[_Request]] = defaultdict(list)
        for req in requests:
            if req.reply is not None:
                continue
            op = req.message["op"]
            if op in ("health", "list"):
                try:
                    req.reply = self._health() if op == "health" else self._list()
                except Exception as exc:  # never expected; this request fails alone
                    logger.error("%s failed in the server: %s", op, type(exc).__name__, exc_info=True)
                    req.reply = self._error(f"{op} failed in the server: {type(exc).__name__}")
            else:
                groups[(op, req.message["model"], req.message.get("version"))].append(req)
        for (op, name, version), reqs in groups.items():
            try:
                self._run_group(op, name, version, reqs)
            except Exception as exc:  # never expected; each of them still gets an answer
                logger.error("%s with %s %s failed outside the model: %s", op, name, version, type(exc).__name__)
                logger.debug("the failure outside the model", exc_info=True)
                for req in reqs:
                    if req.reply is None:
                        req.reply = self._error(f"{op} failed in the server: {type(exc).__name__}",
                                                model=name, version=version)
        for req in requests:
            reply = req.reply
            if isinstance(req.message.get("id"), str | int):
                reply["id"] = req.message["id"]
            self.stats["errors" if not reply["ok"] else "ok"] += 1
            try:
                data = serialize(reply)
            except Exception as exc:  # noqa: BLE001 - never expected (OverflowError, TypeError); still answer
                data = serialize(self._error(f"reply could not be encoded: {type(exc).__name__}: {exc}"))
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
        if not isinstance(op, str) or op not in OPS:
            raise _RequestError(f"malformed request: op must be one of {list(OPS)}, got {op!r}")
        if op in ("encode", "decode", "enhance", "denoise"):
            if not isinstance(message.get("model"), str) or not message["model"]:
                raise _RequestError(f"malformed request: op {op!r} needs a model name")
            if message.get("version") is not None and not isinstance(message["version"], str):
                raise _RequestError("malformed request: version must be a string")
            if not isinstance(message.get("array"), np.ndarray):
                raise _RequestError(f"malformed request: op {op!r} needs an array")
        options = message.get("options", {})
        if not isinstance(options, dict):
            raise _RequestError("malformed request: options must be a map")
        for key, value in options.items():
            if key in ("components", "allow_low_gain") and not isinstance(value, bool):
                raise _RequestError(f"malformed request: options.{key} must be true or false, "
                                    f"got {type(value).__name__}")

    @staticmethod
    def _error(message: str, **info: Any) -> dict[str, Any]:
        return {"ok": False, "error": truncated(message), "model": info.get("model"),
                "version": info.get("version"), "sha256": info.get("sha256")}

    def _health(self) -> dict[str, Any]:
        return {"ok": True, "status": "serving", "model": None, "version": None, "sha256": None,
                "loaded": [f"{n}:{v}" for n, v in self._models], "uptime_s": time.monotonic() - self._started,
                "pid": os.getpid(), "stats": dict(self.stats)}

    def _list(self) -> dict[str, Any]:
        """Every artifact's summary; one that cannot be sent is listed by name, the reason in its ``problems``."""
        models = []
        for art in self.registry.artifacts():
            try:
                serialize(summary := art.summary())
            except Exception as exc:  # noqa: BLE001 - e.g. an integer too large for msgpack in its metrics
                why = truncated(f"cannot be sent: {type(exc).__name__}: {exc}", 300)
                logger.warning("artifact %s %s: its summary %s", art.name, art.version, why)
                summary = {"name": art.name, "version": art.version, "kind": art.kind, "path": str(art.path),
                           "problems": {"summary": why}}
            models.append(summary)
        return {"ok": True, "model": None, "version": None, "sha256": None, "models": models}

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
        elif op == "denoise":
            self._denoise(loaded, valid)
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
        logger.error("%s", truncated(text, 300))
        logger.debug("%s with %s %s failed", op, name, version, exc_info=True)
        return self._error(text, **loaded.info)

    def _enhance(self, loaded: _Loaded, valid: list[tuple[_Request, np.ndarray]]) -> None:
        """InDI: each request's image (Y, X) or images (N, Y, X), one at a time (sizes differ)."""
        from phasestream.models.indi import enhance_image

        art = loaded.artifact
        for req, array in valid:
            options = req.message.get("options", {})
            steps = options.get("steps", art.manifest.get("steps", 8))
            if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 100:
                req.reply = self._error(f"options.steps must be an integer in 1..100, got {steps!r}", **loaded.info)
                continue
            refusal, low_gain = self._refusal(art, options)
            if refusal is not None:
                req.reply = refusal
                continue
            try:
                images = array[None] if array.ndim == 2 else array
                out = np.stack([enhance_image(loaded.model, im, steps=steps, scale=int(art.manifest.get("scale", 2)))
                                for im in images])
            except Exception as exc:  # noqa: BLE001 - nor one in enhancing an image
                req.reply = self._inference_error("enhance", loaded, exc)
                continue
            self.stats["items"] += len(images)
            req.reply = {"ok": True, **loaded.info, "steps": steps, "array": out[0] if array.ndim == 2 else out,
                         "demo": bool(art.manifest.get("demo", False))}
            if low_gain is not None:
                req.reply["low_gain"] = low_gain

    def _refusal(self, art, options: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """``(the reply refusing to enhance with art, None)`` for an image of another domain or a model whose
        validated gain is too low (unless ``options.allow_low_gain``); else ``(None, the low-gain mark or None)``."""
        info = {"model": art.name, "version": art.version, "sha256": art.sha256}
        domain = options.get("domain")
        if not isinstance(domain, str) or domain not in DOMAINS:
            return self._error(f"options.domain must say what the image is, one of {list(DOMAINS)}; got "
                               f"{truncated(repr(domain), 60)}", **info), None
        try:
            check_domain(art.manifest, domain)
            return None, check_gain(art.manifest, allow_low_gain=options.get("allow_low_gain") is True)
        except ModelRefusedError as exc:
            self.stats["refused"] += 1
            reason = "domain" if isinstance(exc, DomainMismatchError) else "low_gain"
            return {**self._error(str(exc), **info), "refused": reason}, None

    def _denoise(self, loaded: _Loaded, valid: list[tuple[_Request, np.ndarray]]) -> None:
        """Denoising: each request's OD stack (E, Y, X), one at a time, optionally fine-tuned on it first."""
        from phasestream.models.denoise import denoise_stack

        for req, array in valid:
            steps = req.message.get("options", {}).get("fine_tune_steps", 0)
            if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps <= 5000:
                req.reply = self._error(f"options.fine_tune_steps must be an integer in 0..5000, got {steps!r}",
                                        **loaded.info)
                continue
            try:
                result = denoise_stack(loaded.model, array, fine_tune_steps=steps)
            except Exception as exc:  # noqa: BLE001 - nor one in denoising a stack
                req.reply = self._inference_error("denoise", loaded, exc)
                continue
            self.stats["items"] += 1
            req.reply = {"ok": True, **loaded.info, "array": result.od, "components": result.components,
                         "posterior_components": result.info["posterior_components"],
                         "shape_averaged_components": result.info["shape_averaged_components"],
                         "shape_averaging": result.info["shape_averaging"],
                         "fine_tune_steps": steps, "seconds": result.info["seconds"]}

    def _check_input(self, op: str, loaded: _Loaded, array: np.ndarray) -> np.ndarray:
        """The request's array as :data:`MODEL_DTYPE`, checked in that dtype (shape, size, finite values)."""
        model, art = loaded.model, loaded.artifact
        if array.dtype.kind not in "fiu":
            raise _RequestError(f"array must be numeric, got dtype {array.dtype}")
        if op == "enhance":
            if array.ndim not in (2, 3) or min(array.shape[-2:]) < 8 or array.size == 0:
                raise _RequestError(f"model {art.name} {art.version} enhances an image (Y, X) or images (N, Y, X) "
                                    f"of at least 8 x 8 pixels; got shape {list(array.shape)}")
        elif op == "denoise":
            if array.ndim != 3 or array.shape[0] < 2 or min(array.shape[1:]) < 8:
                raise _RequestError(f"model {art.name} {art.version} denoises an OD stack (E, Y, X) of at least 2 "
                                    f"energies and 8 x 8 pixels; got shape {list(array.shape)}")
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
        if op not in ("enhance", "denoise"):
            raise _RequestError("array contains NaN or infinite values: send particle pixels only")
        if not finite.any():  # enhance_image and denoise_stack fill NaN pixels with the median
            raise _RequestError("the image has no finite pixel")
        return x


def serve_models(config: ModelServerConfig, *, on_ready: Callable[[dict], None] | None = None) -> int:
    """Run a model server in this process until SIGTERM/SIGINT; prints a ``ready`` JSON line first
    (and calls ``on_ready`` with it)."""
    server = ModelServer(config)
    address = server.bind()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    models = [f"{a.name}:{a.version}" for a in server.registry.artifacts()]
    ready = {"ready": True, "address": address, "models": models}
    print(json.dumps(ready), flush=True)
    if on_ready is not None:
        on_ready(ready)
    stats = server.serve()
    print(json.dumps({"stopped": True, "stats": stats}), flush=True)
    return 0


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

