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
(mode 0600), and is recorded in ``RUN_DIR/stack.json`` (mode 0600: pid, start time and command line
of its process, command, address); ``down`` signals only a process that still matches its record
(:func:`~phasestream.app.supervise.is_running`). ``RUN_DIR/phasestream.env`` (mode 0600) holds the
addresses and the Tiled API key for clients: ``set -a; . ~/.phasestream/run/phasestream.env; set +a``.
Both are written as new files renamed into place, never through a symbolic link, in a run folder
only its user may write (created 0700; ``up`` refuses one of another user or that others may write).
Secrets travel in the environment, never on a command line, a URI or a log: Tiled logs through
``RUN_DIR/tiled/logging.json``, whose filter (:class:`RedactSecrets`) masks database passwords and
``api_key`` values, in exception text too. Every listening socket, Dask's HTTP servers (health,
Prometheus metrics) included, binds 127.0.0.1 unless ``host`` says otherwise.

Without ``tiled_config`` the Tiled server gets a generated configuration in ``RUN_DIR/tiled``
(SQLite catalog, Zarr + DuckDB storage, in-memory streaming cache); ``deploy/tiled/config.yml``
is the PostgreSQL + Redis one for several processes and hosts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from phasestream.app.launch import SERVICES
from phasestream.app.stack_tiled import RedactSecrets, generated_tiled_config, tiled_log_config
from phasestream.app.supervise import (
    alive,
    is_running,
    launch,
    read_state,
    request_restart,
    started_identity,
    write_private,
    write_state,
)
from phasestream.store.tiled import public_uri, separate_api_key

__all__ = ["COMPONENTS", "RedactSecrets", "StackConfig", "down", "restart", "status", "up"]

logger = logging.getLogger(__name__)

COMPONENTS = tuple(service.name for service in SERVICES)
DEFAULT_RUN_DIR = Path("~/.phasestream/run")
# the port settings and the component that binds each
PORTS = {"tiled_port": "tiled", "proxy_in_port": "proxy", "proxy_out_port": "proxy", "models_port": "models",
         "scheduler_port": "scheduler", "scheduler_http_port": "scheduler", "view_port": "view"}


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
        if self.tiled_uri:  # its key travels beside it, in the components' environment, never in stack.json
            self.tiled_uri, key = separate_api_key(self.tiled_uri)
            if key and "TILED_API_KEY" not in self.env:
                self.env = {**self.env, "TILED_API_KEY": str(key)}
        if self.tiled_uri and "tiled" in self.components:
            self.components = tuple(c for c in self.components if c != "tiled")
        if self.dask_workers < 1:
            raise ValueError(f"dask_workers must be >= 1, got {self.dask_workers}")
        self.components = tuple(c for c in COMPONENTS if c in self.components)
        self._validate_ports()
        return self

    def _validate_ports(self) -> None:
        """Each port from 1 to 65535 (0MQ took 70000 as 4464 while the env file said 70000), and each
        component's ports distinct from the others'."""
        taken: dict[int, str] = {}
        for name, component in PORTS.items():
            port = getattr(self, name)
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise ValueError(f"{_option(name)} must be a port number from 1 to 65535, got {port!r}")
            if component in self.components:
                if port in taken:
                    raise ValueError(f"{_option(taken[port])} and {_option(name)} are both {port}: each "
                                     f"service needs a port of its own")
                taken[port] = name

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


def _option(name: str) -> str:
    """``proxy_in_port (--proxy-in-port)``: a setting with the option of ``phasestream up`` that sets it."""
    return f"{name} (--{name.replace('_', '-')})"


# --------------------------------------------------------------------------- commands


def _commands(cfg: StackConfig) -> dict[str, list[str]]:
    """The command line of each component of ``cfg``, from :data:`~phasestream.app.launch.SERVICES`."""
    py = sys.executable
    values = {"python": [py], "phasestream": [py, "-m", "phasestream.app.cli"], "host": cfg.host,
              "tiled_host": cfg.host, "tiled_port": cfg.tiled_port, "tiled": cfg.tiled, "zmq_in": cfg.zmq_in,
              "zmq_out": cfg.zmq_out, "models": cfg.models, "scheduler": cfg.scheduler,
              "scheduler_http": f"{cfg.host}:{cfg.scheduler_http_port}", "dask_workers": cfg.dask_workers,
              "dask_directory": str(cfg.run_dir / "dask"), "view_port": cfg.view_port}
    if "tiled" in cfg.components:
        od_store = {**os.environ, **cfg.env}.get("PHASESTREAM_OD_STORE")
        values["tiled_config"] = str(Path(cfg.tiled_config).resolve() if cfg.tiled_config
                                     else generated_tiled_config(cfg.run_dir / "tiled", od_store))
        values["tiled_log_config"] = str(tiled_log_config(cfg.run_dir / "tiled"))
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
    if pid is not None and not is_running(record):
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
            connections = health.get("connections") or {}
            clients = f", {connections.get('open')} of {connections.get('limit')} connections" if connections else ""
            return bool(health.get("ok")), \
                f"{address} ok, models {health.get('models', health.get('loaded', ''))}{clients}"
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
    write_private(path, "# written by `phasestream up`; load with: set -a; . " + str(path) + "; set +a\n"
                  + "".join(f"{k}={v}\n" for k, v in env.items()))
    return env


def _private_run_dir(run_dir: Path) -> None:
    """Make ``run_dir`` (mode 0700), or check that only this user may write it: it holds the API key, and
    the commands the supervisor runs. ``RuntimeError`` naming it and what to do otherwise."""
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    info, uid = run_dir.stat(), os.geteuid()
    if info.st_uid != uid:
        raise RuntimeError(f"run folder {run_dir} is not owned by you (uid {uid}) but by uid {info.st_uid}: "
                           f"give a --run-dir of your own (default {DEFAULT_RUN_DIR})")
    if info.st_mode & 0o022:
        raise RuntimeError(f"run folder {run_dir} may be written by others (mode {oct(info.st_mode & 0o777)}): "
                           f"`chmod 700 {run_dir}`, or give a --run-dir of your own")


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
    _private_run_dir(cfg.run_dir)
    if _state_path(cfg.run_dir).exists():
        recorded = read_state(cfg.run_dir)
        if any(is_running(r) for r in [*recorded["components"].values(), recorded.get("supervisor", {})]):
            raise RuntimeError(f"a stack is already running from {cfg.run_dir}: `phasestream down` first")
        logger.warning("the stack recorded in %s is gone (its pids run no process it started): starting anew",
                       cfg.run_dir)
    (cfg.run_dir / "logs").mkdir(mode=0o700, parents=True, exist_ok=True)
    api_key = cfg.env.get("TILED_API_KEY") or os.environ.get("TILED_API_KEY") or secrets.token_hex(16)
    client_env = _write_env(cfg, api_key)
    from phasestream.jobs.cluster import WORKER_ENV

    proc_env = {**os.environ, **WORKER_ENV, **cfg.env, "TILED_API_KEY": api_key, "PYTHONUNBUFFERED": "1"}
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items() if k != "env"}
    config["tiled_uri"] = public_uri(cfg.tiled_uri) if cfg.tiled_uri else None
    state: dict[str, Any] = {"config": config, "components": {}}
    write_state(cfg.run_dir, state)  # replaces a stale record at once
    try:
        for name, command in _commands(cfg).items():
            log = cfg.run_dir / "logs" / f"{name}.log"
            proc, offset = launch(command, log, proc_env, cfg.run_dir)
            record = {"pid": proc.pid, "identity": started_identity(proc), "command": command, "log": str(log),
                      "address": _address(name, cfg), "started": time.time(), "log_offset": offset, "restarts": 0}
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
            command = [sys.executable, "-m", "phasestream.app.supervise", str(cfg.run_dir)]
            proc, _ = launch(command, log, proc_env, cfg.run_dir)
            state["supervisor"] = {"pid": proc.pid, "identity": started_identity(proc), "command": command,
                                   "log": str(log), "started": time.time()}
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
        ok = is_running(record)
        report["supervisor"] = {"healthy": ok, "pid": record["pid"], "address": "", "restarts": 0, "last_exit": None,
                                "detail": "restarts components that die" if ok else
                                f"not running: dead components stay dead (log: {record['log']})"}
    return report


def restart(run_dir: Path, name: str, *, timeout: float = 120.0) -> dict:
    """Restart component ``name`` through the supervisor of ``run_dir`` and wait until it is healthy
    again; its new record. ``RuntimeError`` when no supervisor runs or it does not come back healthy."""
    if not _state_path(run_dir).exists():
        raise RuntimeError(f"no stack started from {run_dir} (phasestream up)")
    _private_run_dir(_state_path(run_dir).parent)  # what it signals and runs comes from there
    state = read_state(run_dir)
    if name not in state["components"]:
        raise ValueError(f"no component {name!r} in the stack of {run_dir}; it has: {', '.join(state['components'])}")
    if not is_running(state.get("supervisor", {})):
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
    SIGKILL after ``timeout`` seconds. ``{component: "stopped" | "killed" | "not running" | "stale"}``;
    ``stale``: its pid now runs another process (after a reboot or a crash), which is left alone.
    """
    path = _state_path(run_dir)
    if not path.exists():
        return {}
    _private_run_dir(path.parent)  # what it signals comes from there
    outcome = {}
    supervisor = read_state(run_dir).get("supervisor")
    if supervisor:  # first, so that nothing is started again while the stack stops
        outcome["supervisor"] = _stop("supervisor", supervisor, timeout)
    state = read_state(run_dir)
    for name, record in reversed(list(state["components"].items())):
        outcome[name] = _stop(name, record, timeout)
    path.unlink()
    for request in Path(run_dir).expanduser().resolve().glob("restart-*"):
        request.unlink()
    return outcome


def _stop(name: str, record: dict, timeout: float) -> str:
    """SIGTERM to the process group of ``record``'s process, SIGKILL after ``timeout`` s: stopped, killed,
    not running, or stale (its pid runs another process now: left alone)."""
    pid = record["pid"]
    if not is_running(record):
        if alive(pid):
            logger.warning("%s: pid %d now runs another process than the one recorded; left alone", name, pid)
            return "stale"
        return "not running"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while is_running(record) and time.monotonic() < end:
        _reap(pid)
        time.sleep(0.1)
    outcome = "stopped"
    if is_running(record):
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
