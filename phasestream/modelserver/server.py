"""The model server: pretrained models loaded once, served over pyzmq with msgpack.

``phasestream serve-models [--bind tcp://127.0.0.1:5579]`` runs :class:`ModelServer` in its own
process; analysis callbacks and post-scan jobs talk to it with
:class:`~phasestream.modelserver.client.ModelClient` and never import TensorFlow themselves. The
protocol, its validation rules and its errors: :mod:`phasestream.modelserver.protocol`.

Requests that arrive together for the same model and op are run as one batch (up to
``max_batch_requests`` of them, and no more once they hold ``max_batch_bytes``); when a batch fails
inside the model, each of its requests is run again on its own, so a request the model cannot take
fails alone. SIGTERM (or :meth:`ModelServer.stop`) ends the loop after the current batch. Each op's
work and the input checks: :mod:`phasestream.modelserver.ops`; the settings: :mod:`phasestream.modelserver.config`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from phasestream.models.registry import ArtifactError, ModelNotFoundError, ModelRegistry
from phasestream.modelserver.admission import ConnectionLimit
from phasestream.modelserver.config import ModelServerConfig, add_arguments, config_from_args
from phasestream.modelserver.ops import (
    Loaded,
    RequestError,
    check_input,
    denoise,
    enhance,
    error_reply,
    infer,
    inference_error,
)
from phasestream.modelserver.protocol import MODEL_OPS, OPS, truncated
from phasestream.transport.wire import WireFormatError, deserialize, serialize

__all__ = ["ModelServer", "ModelServerConfig", "add_arguments", "config_from_args", "serve_models"]


logger = logging.getLogger(__name__)

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
        # its own context unless given one: the connection limit's ZAP handler is one per context
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._admission: ConnectionLimit | None = None
        self._models: dict[tuple[str, str], Loaded] = {}
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
        # and a bound on the connections makes the bound per connection one on the server (admission.py)
        self._admission = ConnectionLimit(self._context, sock, self.config.max_connections)
        sock.bind(self.config.bind)
        self.socket = sock
        self.address = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        for spec in self.config.preload:
            name, _, version = spec.partition(":")
            self._model(name, version or None)
        logger.info("model server on %s: at most %d connections, each queueing up to %d requests of %d MB",
                    self.address, self.config.max_connections, RECEIVE_QUEUE_PER_CONNECTION,
                    sock.getsockopt(zmq.MAXMSGSIZE) >> 20)
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
                batch, held = [], 0
                while len(batch) < self.config.max_batch_requests and held < self.config.max_batch_bytes:
                    try:
                        frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    batch.append(frames)
                    held += sum(len(frame) for frame in frames)
                try:
                    self._handle_batch(batch)
                except Exception as exc:  # never expected (each failure is a reply): keep serving
                    logger.error("a batch of %d requests could not be handled: %s", len(batch), type(exc).__name__)
                    logger.debug("the batch's failure", exc_info=True)
        finally:
            if self._admission is not None:
                self._admission.close()
                self._admission = None
            self.socket.close(linger=0)
            self.socket = None
            if self._own_context:
                self._context.term()
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
            except RequestError as exc:
                req.reply = error_reply(str(exc))
            except Exception as exc:  # noqa: BLE001 - a request no check foresaw fails alone
                req.reply = error_reply(f"malformed request: {type(exc).__name__}")
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
                    req.reply = error_reply(f"{op} failed in the server: {type(exc).__name__}")
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
                        req.reply = error_reply(f"{op} failed in the server: {type(exc).__name__}",
                                                model=name, version=version)
        for req in requests:
            reply = req.reply
            if isinstance(req.message.get("id"), str | int):
                reply["id"] = req.message["id"]
            self.stats["errors" if not reply["ok"] else "ok"] += 1
            try:
                data = serialize(reply)
            except Exception as exc:  # noqa: BLE001 - never expected (OverflowError, TypeError); still answer
                data = serialize(error_reply(f"reply could not be encoded: {type(exc).__name__}: {exc}"))
            self.socket.send_multipart([*req.envelope, data], copy=False)

    def _parse(self, payload: memoryview) -> dict[str, Any]:
        size = payload.nbytes
        if size > self.config.max_request_bytes:
            raise RequestError(f"request of {size} bytes exceeds the server's limit of "
                                f"{self.config.max_request_bytes} bytes: send fewer spectra per request")
        try:
            message = deserialize(payload, max_message_size=self.config.max_request_bytes)
        except WireFormatError as exc:
            raise RequestError(f"malformed request: {exc}") from None
        if not isinstance(message, dict):
            raise RequestError(f"malformed request: expected a map, got {type(message).__name__}")
        return message

    @staticmethod
    def _validate(message: dict[str, Any]) -> None:
        op = message.get("op")
        if not isinstance(op, str) or op not in OPS:
            raise RequestError(f"malformed request: op must be one of {list(OPS)}, got {op!r}")
        if op in ("encode", "decode", "enhance", "denoise"):
            if not isinstance(message.get("model"), str) or not message["model"]:
                raise RequestError(f"malformed request: op {op!r} needs a model name")
            if message.get("version") is not None and not isinstance(message["version"], str):
                raise RequestError("malformed request: version must be a string")
            if not isinstance(message.get("array"), np.ndarray):
                raise RequestError(f"malformed request: op {op!r} needs an array")
        options = message.get("options", {})
        if not isinstance(options, dict):
            raise RequestError("malformed request: options must be a map")
        for key, value in options.items():
            if key in ("components", "allow_low_gain") and not isinstance(value, bool):
                raise RequestError(f"malformed request: options.{key} must be true or false, "
                                    f"got {type(value).__name__}")

    def _health(self) -> dict[str, Any]:
        return {"ok": True, "status": "serving", "model": None, "version": None, "sha256": None,
                "loaded": [f"{n}:{v}" for n, v in self._models], "uptime_s": time.monotonic() - self._started,
                "pid": os.getpid(), "stats": dict(self.stats), "connections": self._connections()}

    def _connections(self) -> dict[str, int] | None:
        """The connections open now (this one among them), the limit and how many were refused; None unbound."""
        admission = self._admission
        if admission is None:
            return None
        return {"open": admission.open, "limit": admission.limit, "refused": admission.refused}

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

    def _model(self, name: str, version: str | None) -> Loaded:
        artifact = self.registry.get(name, version)
        key = (artifact.name, artifact.version)
        if key not in self._models:
            t0 = time.perf_counter()
            self._models[key] = Loaded(artifact, artifact.load())
            logger.info("loaded %s %s in %.1f s", *key, time.perf_counter() - t0)
        return self._models[key]

    def _run_group(self, op: str, name: str, version: str | None, reqs: list[_Request]) -> None:
        try:
            loaded = self._model(name, version)
        except (ModelNotFoundError, ArtifactError) as exc:
            for req in reqs:
                req.reply = error_reply(str(exc), model=name, version=version)
            return
        kind = loaded.artifact.kind
        if op not in MODEL_OPS.get(kind, ()):
            for req in reqs:
                req.reply = error_reply(f"model {name!r} is a {kind} model: it supports "
                                        f"{list(MODEL_OPS.get(kind, ()))}, not {op!r}", **loaded.info)
            return
        valid: list[tuple[_Request, np.ndarray]] = []
        for req in reqs:
            try:
                valid.append((req, check_input(op, loaded, req.message["array"], self.config.max_request_bytes)))
            except RequestError as exc:
                req.reply = error_reply(str(exc), **loaded.info)
        if not valid:
            return
        if op in ("enhance", "denoise"):  # one request at a time (sizes differ)
            for req, array in valid:
                req.reply = self._run_one(op, loaded, array, req.message.get("options", {}))
        else:
            self._run_batch(op, loaded, valid)

    def _run_one(self, op: str, loaded: Loaded, array: np.ndarray, options: dict[str, Any]) -> dict[str, Any]:
        """``enhance`` or ``denoise`` of one validated request, counted in the server's stats."""
        reply = enhance(loaded, array, options) if op == "enhance" else denoise(loaded, array, options)
        if reply.get("refused"):
            self.stats["refused"] += 1
        elif reply["ok"]:
            self.stats["items"] += 1 if op == "denoise" or array.ndim == 2 else len(array)
        return reply

    def _run_batch(self, op: str, loaded: Loaded, valid: list[tuple[_Request, np.ndarray]]) -> None:
        """``encode``/``decode`` of validated requests as one batch; if the model raises, each request
        again on its own, so that a request the model cannot take fails alone."""
        try:
            outputs = infer(op, loaded, [a for _, a in valid])
        except Exception as exc:  # noqa: BLE001 - a failure inside the model must not end the server
            if len(valid) > 1:
                logger.warning("%s batch of %d requests with %s %s failed (%s); running them one by one", op,
                               len(valid), loaded.artifact.name, loaded.artifact.version, type(exc).__name__)
                for pair in valid:
                    self._run_batch(op, loaded, [pair])
                return
            req = valid[0][0]
            req.reply = inference_error(op, loaded, exc)
            return
        self.stats["batches"] += 1
        self.stats["items"] += sum(len(a) for _, a in valid)
        for (req, _), output in zip(valid, outputs, strict=True):
            reply = {"ok": True, **loaded.info, "array": output["array"]}
            if op == "encode" and req.message.get("options", {}).get("components"):
                reply["components"] = output["components"]
            req.reply = reply


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
