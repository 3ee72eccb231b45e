"""The whole service on one host: start (``phasestream up``), check (``status``) and stop (``down``) it.

Components, in start order (each waits for the ones before it), launched by the commands of
:data:`phasestream.app.launch.SERVICES` (the ones ``deploy/Procfile`` and the systemd units run):

============  ================================================  =========================================
name          command                                           healthy when
============  ================================================  =========================================
tiled         ``python -m tiled serve config CONFIG ...``       ``/healthz`` 200 and the API key accepted
proxy         ``phasestream proxy --in ... --out ...``          both ports accept
models        ``phasestream serve-models --bind ...``           ``health`` op answers ok
scheduler     ``python -m dask scheduler --host tcp://...``     ``scheduler_info()``
              (health, metrics on ``--scheduler-http-port``)
dask-workers  ``python -m dask worker tcp://... --nworkers N``  N workers registered
worker        ``phasestream serve --zmq ... --tiled URI``       alive and said ready
              (``--models``, ``--scheduler``: the stack's)
view          ``phasestream view --tiled URI --port ...``       ``/healthz`` 200 (the live view's page)
============  ================================================  =========================================

Each runs in its own process group (``start_new_session``), logs to ``RUN_DIR/logs/NAME.log``
(mode 0600), and is recorded in ``RUN_DIR/stack.json`` (pid, command, address).
``RUN_DIR/phasestream.env`` (mode 0600) holds the addresses and the Tiled API key for clients:
``set -a; . ~/.phasestream/run/phasestream.env; set +a``. Secrets travel in the environment,
never on a command line, a URI or a log: Tiled logs through ``RUN_DIR/tiled/logging.json``,
whose filter (:class:`RedactSecrets`) masks database passwords and ``api_key`` values. Every
listening socket, Dask's HTTP servers (health, Prometheus metrics) included, binds 127.0.0.1
unless ``host`` says otherwise.

Without ``tiled_config`` the Tiled server gets a generated configuration in ``RUN_DIR/tiled``
(SQLite catalog, Zarr + DuckDB storage, in-memory streaming cache); ``deploy/tiled/config.yml``
is the PostgreSQL + Redis one for several processes and hosts.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import secrets
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from phasestream.app.launch import SERVICES
from phasestream.app.supervise import alive as _alive
from phasestream.app.supervise import launch, read_state, request_restart, write_state
from phasestream.store.tiled import BLUESKY_RUN_MEDIA_TYPES

__all__ = ["COMPONENTS", "RedactSecrets", "StackConfig", "down", "restart", "status", "up"]

logger = logging.getLogger(__name__)

COMPONENTS = tuple(service.name for service in SERVICES)
DEFAULT_RUN_DIR = Path("~/.phasestream/run")


@dataclass
class StackConfig:
    """Where the components of ``phasestream up`` listen and what they run (validated by :meth:`validate`)."""

    run_dir: Path = DEFAULT_RUN_DIR
    host: str = "127.0.0.1"
    tiled_port: int = 8000
    tiled_uri: str | None = None  # an existing Tiled server: not started
    tiled_config: Path | None = None  # default: generated SQLite configuration in run_dir/tiled
    proxy_in_port: int = 5577
    proxy_out_port: int = 5578
    models_port: int = 5579
    scheduler_port: int = 8786
    scheduler_http_port: int = 8787  # the scheduler's health and Prometheus metrics (no dashboard)
    dask_workers: int = 2
    view_port: int = 8010  # the live view (phasestream view), on ``host``
    components: tuple[str, ...] = COMPONENTS
    worker_args: tuple[str, ...] = ()  # extra arguments of ``phasestream serve``
    models_args: tuple[str, ...] = ()  # extra arguments of ``phasestream serve-models``
    start_timeout: float = 180.0
    supervise: bool = True  # a supervisor restarts components that die (phasestream.app.supervise)
    env: dict[str, str] = field(default_factory=dict)  # extra environment of every component

    def validate(self) -> StackConfig:
        self.run_dir = Path(self.run_dir).expanduser().resolve()
        unknown = set(self.components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)}; known: {', '.join(COMPONENTS)}")
        if self.tiled_uri and "tiled" in self.components:
            self.components = tuple(c for c in self.components if c != "tiled")
        if self.dask_workers < 1:
            raise ValueError(f"dask_workers must be >= 1, got {self.dask_workers}")
        self.components = tuple(c for c in COMPONENTS if c in self.components)
        return self

    # addresses
    @property
    def tiled(self) -> str:
        return (self.tiled_uri or f"http://{self.host}:{self.tiled_port}/api/v1").split("?")[0]

    @property
    def zmq_in(self) -> str:
        return f"tcp://{self.host}:{self.proxy_in_port}"

    @property
    def zmq_out(self) -> str:
        return f"tcp://{self.host}:{self.proxy_out_port}"

    @property
    def models(self) -> str:
        return f"tcp://{self.host}:{self.models_port}"

    @property
    def scheduler(self) -> str:
        return f"tcp://{self.host}:{self.scheduler_port}"

    @property
    def view(self) -> str:
        return f"http://{self.host}:{self.view_port}/"


# --------------------------------------------------------------------------- commands


def _generated_tiled_config(cfg: StackConfig) -> Path:
    folder = cfg.run_dir / "tiled"
    (folder / "data").mkdir(parents=True, exist_ok=True)
    config = {
        "authentication": {"single_user_api_key": "${TILED_API_KEY}", "allow_anonymous_access": False},
        "catalog": {"uri": f"sqlite:///{folder / 'catalog.db'}", "init_if_not_exists": True,
                    "writable_storage": [str(folder / "data"), f"duckdb:///{folder / 'tables.duckdb'}"]},
        "streaming_cache": {"uri": "memory"},
        "media_types": BLUESKY_RUN_MEDIA_TYPES,  # raw runs as documents (databroker, BlueskyRun.documents())
    }
    od_store = {**os.environ, **cfg.env}.get("PHASESTREAM_OD_STORE")
    if od_store:  # the worker writes the live OD cube there (serve --od-store): Tiled must read it
        config["catalog"]["readable_storage"] = [od_store]
    path = folder / "config.yml"
    path.write_text("# generated by `phasestream up`; deploy/tiled/config.yml is the PostgreSQL + Redis one\n"
                    + yaml.safe_dump(config, sort_keys=False))
    return path


class RedactSecrets(logging.Filter):
    """A logging filter for Tiled's handlers: URL passwords and ``api_key=`` values become ``***``.

    Tiled logs its database URI at start-up (``postgresql+asyncpg://tiled:PASSWORD@...``) and
    uvicorn every request line, ``?api_key=`` included when a client puts the key there.
    """

    PATTERNS = ((re.compile(r"(://[^:/@\s]*:)[^@\s]+@"), r"\1***@"), (re.compile(r"(api_key=)[^&\s\"']+"), r"\1***"))

    @classmethod
    def redact(cls, text: str) -> str:
        for pattern, replacement in cls.PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            args = list(record.args)  # (client, method, path, http version, status): the formatter wants them
            args[2] = self.redact(str(args[2]))
            record.args = tuple(args)
            return True
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def _tiled_log_config(cfg: StackConfig) -> Path:
    """Tiled's own logging configuration, with :class:`RedactSecrets` on every handler and no colours."""
    from tiled.server.logging_config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"]["redact"] = {"()": f"{__name__}.RedactSecrets"}
    for handler in config["handlers"].values():
        handler["filters"] = ["redact", *handler.get("filters", [])]
    for formatter in config["formatters"].values():
        formatter["use_colors"] = False
    path = cfg.run_dir / "tiled" / "logging.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    return path


def _commands(cfg: StackConfig) -> dict[str, list[str]]:
    """The command line of each component of ``cfg``, from :data:`~phasestream.app.launch.SERVICES`."""
    py = sys.executable
    values = {"python": [py], "phasestream": [py, "-m", "phasestream.app.cli"], "host": cfg.host,
              "tiled_host": cfg.host, "tiled_port": cfg.tiled_port, "tiled": cfg.tiled, "zmq_in": cfg.zmq_in,
              "zmq_out": cfg.zmq_out, "models": cfg.models, "scheduler": cfg.scheduler,
              "scheduler_http": f"{cfg.host}:{cfg.scheduler_http_port}", "dask_workers": cfg.dask_workers,
              "dask_directory": str(cfg.run_dir / "dask"), "view_port": cfg.view_port}
    if "tiled" in cfg.components:
        values["tiled_config"] = str(Path(cfg.tiled_config).resolve() if cfg.tiled_config
                                     else _generated_tiled_config(cfg))
        values["tiled_log_config"] = str(_tiled_log_config(cfg))
    extra = {"models": cfg.models_args, "worker": cfg.worker_args}
    return {s.name: s.command(values, running=cfg.components, extra=extra.get(s.name, ()), run_dir=True)
            for s in SERVICES if s.name in cfg.components}


# --------------------------------------------------------------------------- health


def _port_open(address: str) -> bool:
    host, _, port = address.rpartition("//")[2].rpartition(":")
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1.0):
        return True
    return False


def _check(name: str, record: dict, env: dict[str, str]) -> tuple[bool, str]:
    """Whether component ``name`` is healthy, and a one-line detail."""
    pid = record.get("pid")
    if pid is not None and not _alive(pid):
        return False, f"process {pid} is not running (log: {record.get('log')})"
    address = record.get("address", "")
    try:
        if name == "tiled":
            base = address.split("/api/")[0]
            if httpx.get(f"{base}/healthz", timeout=3).status_code != 200:
                return False, f"{base}/healthz does not answer 200"
            # the root's metadata: the API root itself answers anyone
            reply = httpx.get(f"{address}/metadata/",
                              headers={"Authorization": f"Apikey {env.get('TILED_API_KEY', '')}"}, timeout=5)
            if reply.status_code != 200:
                return False, f"{address} refused the API key ({reply.status_code})"
            return True, f"{address} reachable, API key accepted"
        if name == "proxy":
            ins, outs = record["address"].split(" -> ")
            ok = _port_open(ins) and _port_open(outs)
            return ok, f"{ins} -> {outs}" + ("" if ok else " not listening")
        if name == "models":
            from phasestream.modelserver.client import ModelClient

            with contextlib.closing(ModelClient(address, timeout=3.0, retries=0)) as client:
                health = client.health()
            return bool(health.get("ok")), f"{address} ok, models {health.get('models', health.get('loaded', ''))}"
        if name in ("scheduler", "dask-workers"):
            from distributed import Client

            with Client(address, timeout="5s") as client:
                n = len(client.scheduler_info()["workers"])
            if name == "scheduler":
                return True, f"{address}, {n} workers"
            expected = int(record.get("expected_workers", 1))
            return n >= expected, f"{n} of {expected} workers registered at {address}"
        if name == "view":
            reply = httpx.get(f"{address.rstrip('/')}/healthz", timeout=3)
            return reply.status_code == 200, f"{address} (open it in a browser)" if reply.status_code == 200 \
                else f"{address}healthz answers {reply.status_code}"
        if name == "worker":
            log = Path(record["log"])  # what this process wrote: the log's part after its start
            ready = log.exists() and '"ready": true' in _read_from(log, int(record.get("log_offset", 0)))
            return ready, f"consuming {address}" if ready else "not ready yet (see its log)"
    except Exception as exc:  # noqa: BLE001 - any failure of a health check is reported, not raised
        return False, f"{type(exc).__name__}: {exc}"
    return False, "unknown component"


def _read_from(path: Path, offset: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


# --------------------------------------------------------------------------- up / status / down


def _state_path(run_dir: Path) -> Path:
    return Path(run_dir).expanduser().resolve() / "stack.json"


def read_env(run_dir: Path) -> dict[str, str]:
    """The variables of ``RUN_DIR/phasestream.env``."""
    path = Path(run_dir).expanduser().resolve() / "phasestream.env"
    env = {}
    if path.exists():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.startswith("#"):
                env[key.strip()] = value.strip()
    return env


def _write_env(cfg: StackConfig, api_key: str) -> dict[str, str]:
    env = {"TILED_URI": cfg.tiled, "TILED_API_KEY": api_key, "PHASESTREAM_ZMQ_IN": cfg.zmq_in,
           "PHASESTREAM_ZMQ_OUT": cfg.zmq_out, "PHASESTREAM_MODEL_SERVER": cfg.models,
           "PHASESTREAM_DASK_SCHEDULER": cfg.scheduler, "PHASESTREAM_VIEW": cfg.view}
    path = cfg.run_dir / "phasestream.env"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# written by `phasestream up`; load with: set -a; . " + str(path) + "; set +a\n")
        f.writelines(f"{k}={v}\n" for k, v in env.items())
    return env


def _address(name: str, cfg: StackConfig) -> str:
    return {"tiled": cfg.tiled, "proxy": f"{cfg.zmq_in} -> {cfg.zmq_out}", "models": cfg.models,
            "scheduler": cfg.scheduler, "dask-workers": cfg.scheduler, "worker": cfg.zmq_out,
            "view": cfg.view}[name]


def up(cfg: StackConfig) -> dict[str, Any]:
    """Start the components of ``cfg`` and wait until each is healthy; the state written to ``stack.json``.

    Raises ``RuntimeError`` (after stopping what it started) when a component does not become
    healthy within ``start_timeout`` seconds, naming it and its log; ``RuntimeError`` too when a
    stack recorded in the run folder is still running.
    """
    cfg.validate()
    state_path = _state_path(cfg.run_dir)
    if state_path.exists() and any(_alive(r["pid"]) for r in read_state(cfg.run_dir)["components"].values()):
        raise RuntimeError(f"a stack is already running from {cfg.run_dir}: `phasestream down` first")
    (cfg.run_dir / "logs").mkdir(mode=0o700, parents=True, exist_ok=True)
    api_key = cfg.env.get("TILED_API_KEY") or os.environ.get("TILED_API_KEY") or secrets.token_hex(16)
    client_env = _write_env(cfg, api_key)
    from phasestream.jobs.cluster import WORKER_ENV

    proc_env = {**os.environ, **WORKER_ENV, **cfg.env, "TILED_API_KEY": api_key, "PYTHONUNBUFFERED": "1"}
    state: dict[str, Any] = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()
                                        if k != "env"}, "components": {}}
    try:
        for name, command in _commands(cfg).items():
            log = cfg.run_dir / "logs" / f"{name}.log"
            proc, offset = launch(command, log, proc_env, cfg.run_dir)
            record = {"pid": proc.pid, "command": command, "log": str(log), "address": _address(name, cfg),
                      "started": time.time(), "log_offset": offset, "restarts": 0}
            if name == "dask-workers":
                record["expected_workers"] = cfg.dask_workers
            state["components"][name] = record
            write_state(cfg.run_dir, state)
            end = time.monotonic() + cfg.start_timeout
            while True:
                ok, detail = _check(name, record, client_env)
                if ok:
                    logger.info("%s healthy: %s", name, detail)
                    break
                if proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"{name} did not start: {detail}; log {log}:\n" + _tail(log))
                time.sleep(0.5)
        if cfg.supervise:
            log = cfg.run_dir / "logs" / "supervisor.log"
            proc, _ = launch([sys.executable, "-m", "phasestream.app.supervise", str(cfg.run_dir)], log, proc_env,
                             cfg.run_dir)
            state["supervisor"] = {"pid": proc.pid, "log": str(log), "started": time.time()}
            write_state(cfg.run_dir, state)
    except BaseException:
        down(cfg.run_dir)
        raise
    return state


def _tail(path: Path, n: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    return ""


def status(run_dir: Path = DEFAULT_RUN_DIR) -> dict[str, dict]:
    """``{component: {healthy, detail, pid, address, restarts, last_exit}}`` of the stack recorded in
    ``run_dir``, and ``supervisor`` (healthy while it runs). An empty dict when no stack was started
    from ``run_dir``.
    """
    path = _state_path(run_dir)
    if not path.exists():
        return {}
    state = read_state(run_dir)
    env = read_env(run_dir)
    report = {}
    for name, record in state["components"].items():
        ok, detail = _check(name, record, env)
        restarts = int(record.get("restarts", 0))
        if restarts:
            detail += f"; restarted {restarts}x, last after {record.get('last_exit', 'unknown')}"
        report[name] = {"healthy": ok, "detail": detail, "pid": record["pid"], "address": record["address"],
                        "restarts": restarts, "last_exit": record.get("last_exit")}
    if "supervisor" in state:
        record = state["supervisor"]
        ok = _alive(record["pid"])
        report["supervisor"] = {"healthy": ok, "pid": record["pid"], "address": "", "restarts": 0, "last_exit": None,
                                "detail": "restarts components that die" if ok else
                                f"not running: dead components stay dead (log: {record['log']})"}
    return report


def restart(run_dir: Path, name: str, *, timeout: float = 120.0) -> dict:
    """Restart component ``name`` through the supervisor of ``run_dir`` and wait until it is healthy
    again; its new record. ``RuntimeError`` when no supervisor runs or it does not come back healthy."""
    state = read_state(run_dir) if _state_path(run_dir).exists() else None
    if state is None:
        raise RuntimeError(f"no stack started from {run_dir} (phasestream up)")
    if name not in state["components"]:
        raise ValueError(f"no component {name!r} in the stack of {run_dir}; it has: {', '.join(state['components'])}")
    if not _alive(state.get("supervisor", {}).get("pid", -1)):
        raise RuntimeError(f"the stack of {run_dir} has no running supervisor: `phasestream down` and `up` again")
    old = state["components"][name]["pid"]
    request_restart(run_dir, name)
    env, end = read_env(run_dir), time.monotonic() + timeout
    while time.monotonic() < end:
        record = read_state(run_dir)["components"][name]
        if record["pid"] != old and _check(name, record, env)[0]:
            return record
        _reap(old)
        time.sleep(0.5)
    log = state["components"][name]["log"]
    raise RuntimeError(f"{name} is not healthy {timeout:.0f} s after its restart; see {log}")


def down(run_dir: Path = DEFAULT_RUN_DIR, *, timeout: float = 30.0) -> dict[str, str]:
    """Stop the stack recorded in ``run_dir``, last started first: SIGTERM to each process group,
    SIGKILL after ``timeout`` seconds. ``{component: "stopped" | "killed" | "not running"}``.
    """
    path = _state_path(run_dir)
    if not path.exists():
        return {}
    outcome = {}
    supervisor = read_state(run_dir).get("supervisor")
    if supervisor:  # first, so that nothing is started again while the stack stops
        outcome["supervisor"] = _stop("supervisor", supervisor["pid"], timeout)
    state = read_state(run_dir)
    for name, record in reversed(list(state["components"].items())):
        outcome[name] = _stop(name, record["pid"], timeout)
    path.unlink()
    for request in Path(run_dir).expanduser().resolve().glob("restart-*"):
        request.unlink()
    return outcome


def _stop(name: str, pid: int, timeout: float) -> str:
    """SIGTERM to the process group of ``pid``, SIGKILL after ``timeout`` s: stopped, killed or not running."""
    if not _alive(pid):
        return "not running"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < end:
        _reap(pid)
        time.sleep(0.1)
    outcome = "stopped"
    if _alive(pid):
        logger.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", name, pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        outcome = "killed"
    _reap(pid)
    return outcome


def _reap(pid: int) -> None:
    """Collect ``pid`` when it is our own exited child (``up`` and ``down`` in one process, as in tests)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
