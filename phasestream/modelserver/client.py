"""Client of the model server: numpy and pyzmq only (no TensorFlow), usable from any process.

:class:`ModelClient` sends one msgpack request per call on a DEALER socket, with a timeout and
retries (the socket is recreated after a timeout); see :mod:`phasestream.modelserver.protocol`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from phasestream.modelserver.protocol import (
    DEFAULT_MODEL_ADDRESS,
    ModelRefused,
    ModelServerError,
    ModelServerUnavailable,
)
from phasestream.transport.wire import deserialize, serialize

__all__ = ["EncodeResult", "ModelClient"]

logger = logging.getLogger(__name__)



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
        self._monitor: zmq.Socket | None = None  # tells a handshake the server refused (too many connections)
        self._lock = threading.Lock()

    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            self._monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            sock.connect(self.address)
            self._socket = sock
        return self._socket

    def _refused(self) -> bool:
        """Whether the server refused this socket's handshake (its connection limit, ``serve-models
        --max-connections``) since it connected."""
        refused = False
        while self._monitor is not None and self._monitor.poll(0):
            refused = refused or recv_monitor_message(self._monitor)["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        return refused

    def _reset(self) -> None:
        if self._socket is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._socket.close(linger=0)
            self._socket = self._monitor = None

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
                refused = False
                sock = self._connect()
                sock.send(payload, copy=False)
                deadline = time.monotonic() + wait_ms / 1000
                poller = zmq.Poller()
                poller.register(sock, zmq.POLLIN)
                poller.register(self._monitor, zmq.POLLIN)
                while (left := deadline - time.monotonic()) > 0:
                    ready = dict(poller.poll(int(1000 * left) + 1))
                    if self._refused():
                        refused = True
                        break
                    if sock not in ready:
                        continue
                    reply = deserialize(sock.recv(copy=False).buffer)
                    # no id: the server could not read our request (too large, undecodable)
                    if isinstance(reply, dict) and reply.get("id") in (message["id"], None):
                        if not reply.get("ok"):
                            error = ModelRefused if reply.get("refused") else ModelServerError
                            raise error(reply.get("error") or "model server error")
                        return reply
                    # a late reply to an earlier attempt: ignore it
                logger.warning("%s the model server at %s (attempt %d of %d)", "refused by" if refused else
                               "no reply from", self.address, attempt + 1, self.retries + 1)
                self._reset()
        if refused:
            raise ModelServerUnavailable(f"the model server at {self.address} refused the connection: as many "
                                         "clients are connected as it allows (serve-models --max-connections); "
                                         "try again when fewer are")
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

    def enhance(self, model: str, images: np.ndarray, *, domain: str, version: str | None = None,
                steps: int | None = None, allow_low_gain: bool = False, timeout: float | None = None) -> dict:
        """InDI-enhanced image(s): the reply (``array`` (Y*s, X*s) or (N, Y*s, X*s), ``steps``, model info).

        ``domain`` says what the images are (``transmission``, ``od`` or ``counts``): the server refuses
        (:class:`~phasestream.modelserver.protocol.ModelRefused`) a model trained on another domain, and one
        whose validated gain over bicubic is below 1 dB unless ``allow_low_gain`` (the reply then carries
        ``low_gain``). ``demo`` in the reply: the model is a demonstration model.
        """
        options: dict[str, Any] = {"domain": domain}
        if allow_low_gain:
            options["allow_low_gain"] = True
        if steps is not None:
            options["steps"] = int(steps)
        return self.request("enhance", model=model, version=version, array=np.asarray(images, np.float32),
                            options=options, timeout=timeout)

    def denoise(self, model: str, od: np.ndarray, *, version: str | None = None, fine_tune_steps: int = 0,
                timeout: float | None = None) -> dict:
        """Denoised OD stack: the reply (``array`` (E, Y, X), ``components``, ``seconds``, model info)."""
        return self.request("denoise", model=model, version=version, array=np.asarray(od, np.float32),
                            options={"fine_tune_steps": int(fine_tune_steps)}, timeout=timeout)

    def decode(self, model: str, latent: np.ndarray, *, version: str | None = None) -> np.ndarray:
        return self.request("decode", model=model, version=version, array=np.asarray(latent, np.float32))["array"]

    def close(self) -> None:
        with self._lock:
            self._reset()

    def __enter__(self) -> ModelClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
