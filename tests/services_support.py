"""Private PostgreSQL and Redis servers for tests: started in a temporary folder on free ports, stopped after.

The binaries come from the Debian packages ``postgresql`` and ``redis-server``
(``.ci/ensure-services.sh`` installs them when missing). PostgreSQL refuses to run as root: as
root, its commands run as the ``postgres`` system user (``runuser``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["free_port", "postgres_bin", "private_postgres", "private_redis", "redis_bin"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
def private_postgres(*, database: str = "tiled") -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1:<free port> with ``database``; yields ``postgresql://...`` (no driver).

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
    port = free_port()
    subprocess.run(_as_postgres_user([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                      "-E", "UTF8", "--no-sync"]), check=True, capture_output=True)
    log = folder / "postgres.log"
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    subprocess.run(_as_postgres_user([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                                      "-w", "start"]), check=True, capture_output=True)
    try:
        _wait_port(port, 30, "PostgreSQL")
        subprocess.run(_as_postgres_user([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                                          "-U", "postgres", database]), check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/{database}"
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
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder), "--logfile", str(folder / "redis.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, 20, "Redis", proc)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
