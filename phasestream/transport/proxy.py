"""The 0MQ proxy between RunEngine publishers and analysis workers, in this process or a subprocess.

The proxy is bluesky's (:class:`bluesky.callbacks.zmq.Proxy`): frames are forwarded untouched, so a stock
``bluesky-zmq-proxy`` works as well. As a service it runs as ``phasestream proxy --in ADDRESS --out
ADDRESS``, which prints one JSON line ``{"ready": true, "in_address": ..., "out_address": ...}`` once
bound; :func:`start_proxy` starts that command and reads the line.
"""

from __future__ import annotations

import json
import logging
import selectors
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any

from bluesky.callbacks.zmq import Proxy

from phasestream.transport.wire import DEFAULT_IN_ADDRESS, DEFAULT_OUT_ADDRESS, LOCALHOST, normalize_address

__all__ = ["PROXY_COMMAND", "ProxyProcess", "run_proxy", "start_proxy"]

logger = logging.getLogger(__name__)

# the `phasestream proxy` command, run as a module: a command line, not an import of the application layer
PROXY_COMMAND = ("-m", "phasestream.app.cli", "proxy")


def _bind_address(address: str | int | tuple[str, int]) -> str:
    """Bind address for bluesky's Proxy; port 0 becomes bluesky's random-port form (no port)."""
    address = normalize_address(address)
    for suffix in (":0", ":*"):
        if address.startswith("tcp://") and address.endswith(suffix):
            return address[: -len(suffix)]
    return address


def run_proxy(
    in_address: str | int | tuple[str, int] = DEFAULT_IN_ADDRESS,
    out_address: str | int | tuple[str, int] = DEFAULT_OUT_ADDRESS,
    *,
    on_ready: Any = None,
) -> None:
    """Run bluesky's 0MQ proxy until SIGTERM/SIGINT (blocking; a process entry point).

    Parameters
    ----------
    in_address, out_address : str or int or tuple
        Bind addresses for publishers and for receivers. A bare port binds 127.0.0.1 only (bluesky's Proxy
        would bind 0.0.0.0 for an int and all interfaces for None); port 0 picks a free port.
    on_ready : callable, optional
        ``on_ready(in_address, out_address)`` with the bound addresses, before forwarding starts.

    Raises
    ------
    zmq.ZMQError
        When an address cannot be bound (taken port, unknown interface).

    Notes
    -----
    ``Proxy.start()`` blocks inside libzmq, where a signal arriving outside its poll is only noticed at the
    next message. Forwarding therefore runs in a daemon thread while the main thread waits for the signal
    and returns; the process then exits. Called outside the main thread, it forwards forever.
    """
    proxy = Proxy(in_address=_bind_address(in_address), out_address=_bind_address(out_address))
    bound_in, bound_out = str(proxy.in_port), str(proxy.out_port)
    logger.info("proxy forwarding documents from %s to %s", bound_in, bound_out)
    if threading.current_thread() is not threading.main_thread():
        if on_ready is not None:
            on_ready(bound_in, bound_out)
        proxy.start()
        return
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        forwarder = threading.Thread(target=proxy.start, name="phasestream-proxy", daemon=True)
        forwarder.start()
        if on_ready is not None:
            on_ready(bound_in, bound_out)
        while not stop.wait(1.0) and forwarder.is_alive():
            pass
        logger.info("proxy %s -> %s stopped", bound_in, bound_out)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class ProxyProcess:
    """A proxy subprocess started by :func:`start_proxy`, with its bound addresses."""

    process: subprocess.Popen
    in_address: str
    out_address: str

    def stop(self, timeout: float = 5.0) -> int:
        """Terminate the proxy (SIGTERM, then SIGKILL after ``timeout`` s); returns the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("proxy pid %d ignored SIGTERM for %.1f s; killing it", self.process.pid, timeout)
                self.process.kill()
                self.process.wait(timeout)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_proxy(in_port: int = 0, out_port: int = 0, *, host: str = LOCALHOST, timeout: float = 20.0) -> ProxyProcess:
    """Start the proxy in a subprocess (``phasestream proxy``) and wait until it binds.

    Parameters
    ----------
    in_port, out_port : int
        Ports for publishers and receivers; 0 picks free ports.
    host : str
        Interface to bind, 127.0.0.1 by default.
    timeout : float
        Seconds to wait for the subprocess to report its bound addresses.

    Returns
    -------
    ProxyProcess
        ``in_address`` for :class:`~phasestream.transport.wire.DocumentPublisher`, ``out_address`` for the
        worker; stop it with ``stop()`` or use it as a context manager.
    """
    command = [sys.executable, *PROXY_COMMAND, "--in", f"tcp://{host}:{in_port}", "--out", f"tcp://{host}:{out_port}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE)
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        line = process.stdout.readline() if selector.select(timeout) else b""
    try:
        addresses = json.loads(line)
        return ProxyProcess(process, addresses["in_address"], addresses["out_address"])
    except (ValueError, KeyError):
        ProxyProcess(process, "", "").stop()
        raise RuntimeError(
            f"proxy subprocess did not report its addresses within {timeout} s (exit code {process.returncode}); "
            f"are ports {in_port}/{out_port} on {host} free?"
        ) from None
