"""A ``phasestream`` service command in a subprocess, started once it says it is ready.

Every long-running command (``serve``, ``serve-models``) prints one JSON line containing
``"ready"`` when it can take work, and a JSON line containing ``"stopped"`` (with its final
statistics) when SIGTERM has stopped it cleanly. :class:`ServiceProcess` starts such a command,
waits for the ready line, and stops it with SIGTERM (then SIGKILL after a timeout).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time

__all__ = ["ModelServerProcess", "ServiceProcess"]

logger = logging.getLogger(__name__)

READER_TIMEOUT = 5.0
"""Seconds :meth:`ServiceProcess.stop` waits, after the process exited, for the last lines of its stdout."""


class ServiceProcess:
    """``python -m phasestream.app.cli ARGS...`` in a subprocess; use as a context manager or start/stop.

    Parameters
    ----------
    args : the command line after ``phasestream``, e.g. ``("serve-models", "--bind", ADDR)``
    env : variables added to this process's environment (secrets go here, not on the command line)
    timeout : seconds to wait for the ready line
    what : the service's name in error messages

    Attributes
    ----------
    ready : the parsed ready line once started
    stopped : the parsed stopped line once stopped (None if it never came: killed, crashed)
    proc : the :class:`subprocess.Popen`
    """

    def __init__(self, args: tuple[str, ...], *, env: dict[str, str] | None = None, timeout: float = 120.0,
                 what: str = "service"):
        self.command = [sys.executable, "-m", "phasestream.app.cli", *args]
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.timeout = timeout
        self.what = what
        self.proc: subprocess.Popen | None = None
        self.ready: dict = {}
        self.stopped: dict | None = None
        self._lines: queue.Queue = queue.Queue()
        self._reader: threading.Thread | None = None

    def start(self):
        """Start the command and return ``self`` once it printed its ready line."""
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, text=True, env=self.env)
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True,
                                        name=f"{self.what} stdout")
        self._reader.start()
        end = time.monotonic() + self.timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"{self.what} did not start within {self.timeout:.0f} s") from None
            if line is None:  # its stdout ended: the process exited (a bad option, a crash) before it was ready
                self.stop()
                raise RuntimeError(f"{self.what} exited with status {self.proc.returncode} before it was ready "
                                   "(its stderr says why)")
            if '"ready"' in line:
                self.ready = json.loads(line)
                return self

    def stop(self, timeout: float = 30.0) -> dict:
        """SIGTERM, wait (SIGKILL after ``timeout`` s) and return the ``stopped`` line's statistics."""
        if self.proc is None:
            return {}
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._reader is not None:
            # the pipe ends once the process (and any child it handed its stdout to) has exited
            self._reader.join(READER_TIMEOUT)
            if self._reader.is_alive():
                logger.warning("%s (pid %d) exited but its stdout is still open (a child process holds it); "
                               "its last lines may be missing", self.what, self.proc.pid)
        while not self._lines.empty():
            line = self._lines.get()
            if line is not None and '"stopped"' in line:
                self.stopped = json.loads(line)
        return (self.stopped or {}).get("stats", {})

    def _read(self, stdout) -> None:
        for line in stdout:
            self._lines.put(line)
        self._lines.put(None)  # the end of its stdout

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ModelServerProcess(ServiceProcess):
    """``phasestream serve-models`` in a subprocess (demo, tests); ``address`` once started."""

    def __init__(self, bind: str = "tcp://127.0.0.1:*", *, args: tuple[str, ...] = (), timeout: float = 120.0,
                 env: dict[str, str] | None = None):
        super().__init__(("serve-models", "--bind", bind, *args), env=env, timeout=timeout, what="model server")

    @property
    def address(self) -> str | None:
        """The bound address (``tcp://127.0.0.1:PORT``) once started."""
        return self.ready.get("address")
