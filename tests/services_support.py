"""Private PostgreSQL and Redis servers for tests: started in a temporary folder on free ports, stopped after;
and the ports of servers started by tests.

The binaries come from the Debian packages ``postgresql`` and ``redis-server``
(``.ci/ensure-services.sh`` installs them when missing). PostgreSQL refuses to run as root: as
root, its commands run as the ``postgres`` system user (``runuser``).

Ports: a server that can bind port 0 and say which port it got does so (``tiled serve --port 0``,
read back with :func:`uvicorn_port`; the model server and the 0MQ proxy report their addresses).
A port that must be known before the server starts comes from :func:`free_port`, which another
process may take first: the caller starts again on a new port when the server could not bind it
(:data:`PORT_TAKEN` in its output), at most :data:`PORT_ATTEMPTS` times.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PORT_ATTEMPTS", "PORT_TAKEN", "free_port", "postgres_bin", "private_postgres", "private_redis",
           "redis_bin", "refused_port", "stack_port_taken", "uvicorn_port"]

PORT_TAKEN = re.compile(r"address already in use", re.IGNORECASE)
"""How every server here says that its port was taken (uvicorn, 0MQ, Dask, Redis, PostgreSQL)."""
PORT_ATTEMPTS = 5


def free_port() -> int:
    """A port of 127.0.0.1 that is free now; another process may bind it before the caller does (see above)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A port of 127.0.0.1 that refuses connections while the block runs: bound by us, never listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


_UVICORN_RUNNING = re.compile(rb"Uvicorn running on \S*?https?://[^\s:]+:(\d+)")


def uvicorn_port(log: Path, proc: subprocess.Popen, *, offset: int = 0, timeout: float = 60.0,
                 what: str = "tiled") -> int:
    """The port that ``tiled serve ... --port 0`` (``proc``, writing to ``log``) bound, once it serves.

    Read from uvicorn's line ``Uvicorn running on http://HOST:PORT`` in ``log`` after byte ``offset``
    (logged after the application started). Raises RuntimeError, with the log's end, when the
    process exits first, TimeoutError after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        text = Path(log).read_bytes()[offset:] if Path(log).exists() else b""
        found = _UVICORN_RUNNING.search(text)
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before serving; {log}:\n"
                               + text[-2000:].decode(errors="replace"))
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not serve within {timeout:.0f} s; {log}:\n"
                               + text[-2000:].decode(errors="replace"))
        time.sleep(0.1)


def stack_port_taken(run_dir: Path) -> bool:
    """Whether a component of a ``phasestream up`` in ``run_dir`` could not bind its port (its log says so)."""
    return any(PORT_TAKEN.search(log.read_text(errors="replace")) for log in (Path(run_dir) / "logs").glob("*.log"))


def postgres_bin() -> Path | None:
    """The folder of ``initdb``/``pg_ctl``/``postgres``, or None when PostgreSQL is not installed."""
    for found in (shutil.which("pg_ctl"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)):
        if found:
            return Path(found).resolve().parent
    return None


def redis_bin() -> str | None:
    return shutil.which("redis-server")


def _as_postgres_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def _wait_port(port: int, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on port {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


@contextlib.contextmanager
def private_postgres(*, database: str = "tiled", password: str | None = None) -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1:<free port> with ``database``; yields ``postgresql://...`` (no driver).

    With ``password``, connections over TCP must give it (scram-sha-256, as a deployed server asks);
    without, any role is trusted.

    Its data live in a fresh folder under the system temporary folder (reachable by the
    ``postgres`` user when we are root; pytest's own tmp folders are not), removed afterwards.
    """
    bindir = postgres_bin()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL is not installed (apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="phasestream-postgres-"))
    data, sockets = folder / "pgdata", folder / "pgsock"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        shutil.chown(sockets, "postgres", "postgres")
    auth = ["--auth=trust"]
    if password is not None:
        pwfile = folder / "pwfile"
        pwfile.write_text(password + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
    subprocess.run(_as_postgres_user([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", *auth,
                                      "-E", "UTF8", "--no-sync"]), check=True, capture_output=True)
    for attempt in range(1, PORT_ATTEMPTS + 1):  # the port is on the command line: again on a new one if taken
        port, log = free_port(), folder / f"postgres-{attempt}.log"
        options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        started = subprocess.run(_as_postgres_user([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o",
                                                    options, "-w", "start"]), capture_output=True, text=True)
        if started.returncode == 0:
            break
        output = started.stdout + started.stderr + (log.read_text(errors="replace") if log.exists() else "")
        if attempt == PORT_ATTEMPTS or not PORT_TAKEN.search(output):
            shutil.rmtree(folder, ignore_errors=True)
            raise RuntimeError(f"PostgreSQL did not start on 127.0.0.1:{port}:\n{output[-2000:]}")
    try:
        _wait_port(port, 30, "PostgreSQL")
        subprocess.run(_as_postgres_user([str(bindir / "createdb"), "-h", str(sockets), "-p", str(port),
                                          "-U", "postgres", database]), check=True, capture_output=True)
        user = "postgres" if password is None else f"postgres:{password}"
        yield f"postgresql://{user}@127.0.0.1:{port}/{database}"
    finally:
        subprocess.run(_as_postgres_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def private_redis(folder: Path) -> Iterator[str]:
    """A Redis server on 127.0.0.1:<free port>, no persistence; yields ``redis://127.0.0.1:<port>``."""
    binary = redis_bin()
    if binary is None:
        raise FileNotFoundError("Redis is not installed (apt-get install redis-server)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, PORT_ATTEMPTS + 1):  # the port is on the command line: again on a new one if taken
        port, log = free_port(), folder / f"redis-{attempt}.log"
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                 "no", "--dir", str(folder), "--logfile", str(log)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_port(port, 20, "Redis", proc)
            if _redis_pong(port) and proc.poll() is None:  # ours answers, not whoever took the port
                break
            raise RuntimeError(f"Redis did not start on 127.0.0.1:{port}")
        except (RuntimeError, TimeoutError) as exc:
            _stop(proc)
            text = log.read_text(errors="replace") if log.exists() else ""
            if attempt == PORT_ATTEMPTS or not PORT_TAKEN.search(text):
                raise RuntimeError(f"{exc}; {log}:\n{text[-2000:]}") from None
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        _stop(proc)


def _redis_pong(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")
    return False


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
