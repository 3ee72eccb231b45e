"""``phasestream deploy check``: is this configuration ready to start the services on this host?

Checks, each ``ok``, ``warning`` or ``error`` with one line for people:

- the settings themselves (:func:`phasestream.app.settings.problems`): placeholders, the API key's
  format, addresses;
- folders: those the services write (Tiled's data folder, the OD store, the model folder) exist and
  are writable by this user, those they read (detector files, reference folders) exist;
- PostgreSQL: Tiled's catalog and table databases accept the configured role and password
  (``PGUSER``/``PGPASSWORD``, with asyncpg, as Tiled connects); a SQLite catalog's folder exists;
- Redis: answers ``PING`` (redis-py, as Tiled's streaming cache);
- ports: each address a service binds on this host is free, or already served (a running stack:
  a warning, and then Tiled must accept the key).

Secrets never appear in the report: database URIs are shown with the password masked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from phasestream.app.settings import Settings, mask, problems

__all__ = ["Check", "deploy_check"]

TIMEOUT = 5.0


@dataclass(frozen=True)
class Check:
    name: str
    level: str  # ok, warning, error
    detail: str


def _folders(settings: Settings) -> list[Check]:
    checks = []
    written = {"tiled_data": settings.tiled_data, "od_store": settings.od_store,
               "models": settings.model_folders[0] if settings.model_folders else None}
    read = {"detector_files": settings.detector_files,
            **{f"references[{i}]": f for i, f in enumerate(settings.reference_folders)}}
    for name, folder in {**written, **read}.items():
        if not folder:
            continue
        path = Path(folder)
        if not path.is_dir():
            hint = "create it (mkdir -p, owned by the service user)" if name in written else "mount or create it"
            checks.append(Check(f"folder {name}", "error", f"{folder} does not exist: {hint}"))
        elif name in written and not os.access(path, os.W_OK | os.X_OK):
            checks.append(Check(f"folder {name}", "error", f"{folder} is not writable by this user"))
        elif not os.access(path, os.R_OK | os.X_OK):
            checks.append(Check(f"folder {name}", "error", f"{folder} is not readable by this user"))
        else:
            checks.append(Check(f"folder {name}", "ok", f"{folder} {'writable' if name in written else 'readable'}"))
    return checks


async def _postgres(uri: str, settings: Settings) -> None:
    """Connect as Tiled does: the role and password from ``PGUSER``/``PGPASSWORD`` unless the URI names them."""
    import asyncpg

    dsn = re.sub(r"^postgresql\+\w+://", "postgresql://", uri)
    password = settings.db_password.get_secret_value() if settings.db_password else None
    connection = await asyncio.wait_for(asyncpg.connect(dsn, user=settings.db_user, password=password,
                                                        timeout=TIMEOUT), TIMEOUT + 1)
    try:
        await connection.fetchval("SELECT 1")
    finally:
        await connection.close()


def _databases(settings: Settings) -> list[Check]:
    checks = []
    for name in ("tiled_catalog", "tiled_tables"):
        uri = getattr(settings, name)
        if not uri:
            continue
        shown = mask(name, uri)
        if uri.startswith("sqlite"):
            path = Path(uri.split(":///", 1)[-1])
            ok = path.parent.is_dir()
            checks.append(Check(f"database {name}", "ok" if ok else "error",
                                f"{shown}" + ("" if ok else f": folder {path.parent} does not exist")))
            continue
        if not uri.startswith("postgresql"):
            continue
        try:
            asyncio.run(_postgres(uri, settings))
        except Exception as exc:  # noqa: BLE001 - every failure is the answer
            message = str(exc) or type(exc).__name__
            checks.append(Check(f"database {name}", "error", f"{shown}: {type(exc).__name__}: "
                                                             f"{mask(name, message)}"))
        else:
            checks.append(Check(f"database {name}", "ok", f"{shown} accepts the role and password"))
    return checks


def _redis(settings: Settings) -> list[Check]:
    if not settings.redis:
        return []
    import redis

    try:
        client = redis.Redis.from_url(settings.redis, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
        with contextlib.closing(client):
            client.ping()
    except Exception as exc:  # noqa: BLE001
        return [Check("redis", "error", f"{mask('redis', settings.redis)}: {type(exc).__name__}: {exc}")]
    return [Check("redis", "ok", f"{mask('redis', settings.redis)} answers PING")]


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition("//")[2].rpartition(":")
    return host, int(port)


def _ports(settings: Settings) -> list[Check]:
    binds = {"tiled": f"{settings.tiled_host}:{settings.tiled_port}", "proxy in": settings.zmq_in,
             "proxy out": settings.zmq_out, "model server": settings.model_server}
    if settings.scheduler and settings.scheduler != "local":
        binds["dask scheduler"] = settings.scheduler
    checks = []
    for name, address in binds.items():
        try:
            host, port = _host_port(address)
        except ValueError:
            continue  # problems() reports the malformed address
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError as exc:
                in_use = exc.errno == 98  # EADDRINUSE
                level = "warning" if in_use else "error"
                why = "in use (a running service? `phasestream status`)" if in_use else f"cannot bind: {exc}"
                checks.append(Check(f"port {name}", level, f"{host}:{port} {why}"))
            else:
                checks.append(Check(f"port {name}", "ok", f"{host}:{port} free"))
    return checks


def _tiled(settings: Settings) -> list[Check]:
    """A Tiled server already answering at TILED_URI must accept the key."""
    if not settings.tiled_uri:
        return [Check("tiled", "warning", "TILED_URI is not set: commands need --tiled URI")]
    from phasestream.store.tiled import TiledConnectionError, connect, describe_tiled_error, public_uri

    try:
        connect(settings.tiled_uri, api_key=settings.api_key)
    except TiledConnectionError:
        return [Check("tiled", "ok", f"nothing answers at {public_uri(settings.tiled_uri)} yet")]
    except Exception as exc:  # noqa: BLE001
        return [Check("tiled", "error", describe_tiled_error(exc) or f"{type(exc).__name__}: {exc}")]
    return [Check("tiled", "ok", f"{public_uri(settings.tiled_uri)} answers and accepts the API key")]


def deploy_check(settings: Settings) -> list[Check]:
    """Every check of the module docstring, in order."""
    checks = [Check(f"setting {p.setting}", p.level, p.message) for p in problems(settings)]
    return [*checks, *_folders(settings), *_databases(settings), *_redis(settings), *_ports(settings),
            *_tiled(settings)]
