"""`phasestream up` keeps to itself: sockets on the configured host, no secret in its logs, logs
readable by their owner only, and Tiled errors told to people in one line.

One stack per module (every component, PostgreSQL catalog with a password in its URI when
PostgreSQL is installed, else the generated SQLite one), a raw run written to its Tiled and a
`reprocess` of it on its Dask workers, then the checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
from bluesky import RunEngine
from services_support import PORT_ATTEMPTS, free_port, postgres_bin, private_postgres, refused_port, stack_port_taken

from phasestream.app.cli import main
from phasestream.app.stack import StackConfig, down, read_env, up
from phasestream.references import load_references, select_energies
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.tiled import connect, describe_tiled_error, raw_run_writer

# the whole service started with `phasestream up`: `make test-stack` (in .ci/run), not `make test`
pytestmark = pytest.mark.stack

DEPLOY_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "tiled" / "config.yml"
ENERGIES = select_energies(load_references("nvpf-synthetic"), 5)
PASSWORD = "Pg" + os.urandom(8).hex()


def _postgres_env(pg: str, folder: Path) -> dict[str, str]:
    """The variables of deploy/tiled/config.yml for ``pg``, its URI carrying PASSWORD (trust auth ignores it)."""
    uri = pg.replace("postgres@", f"postgres:{PASSWORD}@")
    for name in ("data", "detector", "od-store"):
        (folder / name).mkdir()
    return {"PHASESTREAM_TILED_CATALOG": uri.replace("postgresql://", "postgresql+asyncpg://"),
            "PHASESTREAM_TILED_TABLES": uri, "PHASESTREAM_TILED_DATA": str(folder / "data"),
            "PHASESTREAM_DETECTOR_FILES": str(folder / "detector"), "PHASESTREAM_OD_STORE": str(folder / "od-store"),
            "PHASESTREAM_REDIS": "memory"}  # one Tiled process: no Redis needed


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """``(cfg, env)`` of a running stack (all components), after a reprocess on its Dask workers."""
    folder = tmp_path_factory.mktemp("stack")
    with private_postgres() if postgres_bin() else contextlib.nullcontext() as pg:
        env = {"TILED_API_KEY": "sec" + os.urandom(12).hex(), **(_postgres_env(pg, folder) if pg else {})}
        try:
            for attempt in range(1, PORT_ATTEMPTS + 1):  # the stack's ports are fixed before it starts
                cfg = StackConfig(run_dir=folder / "run", tiled_port=free_port(), proxy_in_port=free_port(),
                                  proxy_out_port=free_port(), models_port=free_port(), scheduler_port=free_port(),
                                  scheduler_http_port=free_port(), view_port=free_port(), dask_workers=1,
                                  worker_args=("--no-refine", "--backend=numpy"), env=dict(env),
                                  tiled_config=DEPLOY_CONFIG if pg else None)
                shutil.rmtree(cfg.run_dir / "logs", ignore_errors=True)  # only this attempt's logs tell why
                try:
                    up(cfg)
                    break
                except RuntimeError:
                    if attempt == PORT_ATTEMPTS or not stack_port_taken(cfg.run_dir):
                        raise
            env = read_env(cfg.run_dir)
            _reprocess_on_the_stack(env)
            yield cfg, env
        finally:
            down(folder / "run")


def _reprocess_on_the_stack(env: dict[str, str]) -> None:
    """A raw run written by TiledWriter, then `reprocess` of it on the stack's Dask workers (a post-scan job)."""
    client = connect(env["TILED_URI"], api_key=env["TILED_API_KEY"])
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client))
    sample = make_sample((24, 24), state_of_charge=2.0, seed=5, n_particles=2)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, i0=6000.0, seed=5)
    (uid,) = RE(energy_stack_scan([det], energy, ENERGIES, sample=sample, i0_key=det.i0_key))
    # the key in the URI, as an embedded server's URI carries it: it must reach Tiled in a header only
    code = main(["reprocess", uid, "--tiled", f"{env['TILED_URI']}?api_key={env['TILED_API_KEY']}",
                 "--scheduler", env["PHASESTREAM_DASK_SCHEDULER"], "--backend", "numpy", "--json"])
    assert code == 0
    assert client["phasestream"][uid].metadata["status"] == "complete"


def _tree(pid: int) -> list[psutil.Process]:
    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _listening(cfg: StackConfig) -> dict[str, set[tuple[str, int]]]:
    """``{component: {(ip, port)}}`` of the sockets each component's processes listen on."""
    state = json.loads((cfg.run_dir / "stack.json").read_text())
    found: dict[str, set[tuple[str, int]]] = {}
    for name, record in state["components"].items():
        found[name] = set()
        for proc in _tree(record["pid"]):
            try:
                connections = proc.net_connections(kind="inet")
            except psutil.NoSuchProcess:
                continue
            found[name] |= {(c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN}
    return found


def test_every_socket_of_the_stack_binds_the_configured_host(stack):
    cfg, _ = stack
    found = _listening(cfg)
    assert set(found) == {"tiled", "proxy", "models", "scheduler", "dask-workers", "worker", "view"}
    everywhere = {name: sorted(s) for name, s in found.items() if {ip for ip, _ in s} - {cfg.host}}
    assert not everywhere, f"sockets not bound to {cfg.host}: {everywhere}"
    ports = {name: {port for _, port in s} for name, s in found.items()}
    assert {cfg.scheduler_port, cfg.scheduler_http_port} <= ports["scheduler"]  # health and metrics too
    assert httpx.get(f"http://{cfg.host}:{cfg.scheduler_http_port}/health", timeout=5).text == "ok"
    assert len(ports["dask-workers"]) >= 3  # nanny, worker and the worker's HTTP server, all on the host
    assert cfg.tiled_port in ports["tiled"] and cfg.models_port in ports["models"]
    assert ports["view"] == {cfg.view_port}


def test_the_logs_hold_no_api_key_and_no_database_password(stack):
    cfg, env = stack
    logs = sorted((cfg.run_dir / "logs").iterdir())
    assert {p.name for p in logs} >= {f"{name}.log" for name in ("tiled", "proxy", "models", "scheduler",
                                                                   "dask-workers", "worker", "view")}
    tiled_log = (cfg.run_dir / "logs" / "tiled.log").read_text()
    assert '"GET /api/v1/' in tiled_log  # request lines are logged; keys must not be
    for path in [*logs, cfg.run_dir / "stack.json"]:
        text = path.read_text(errors="replace")
        assert env["TILED_API_KEY"] not in text, f"API key in {path.name}"
        if path.name != "tiled.log":
            assert "api_key=" not in text, f"an api_key query in {path.name}"
    # Tiled's start-up banner shows the random key of its default settings, which the configured
    # key replaces before the server starts (tiled.server.app.print_server_info): it must not work
    banner = re.findall(r"\?api_key=(\w+)", tiled_log)
    assert len(banner) <= 1, banner
    for key, status in [(env["TILED_API_KEY"], 200), *((stale, 401) for stale in banner)]:
        reply = httpx.get(f"{env['TILED_URI']}/metadata/", headers={"Authorization": f"Apikey {key}"}, timeout=5)
        assert reply.status_code == status
    if cfg.tiled_config is None:
        pytest.skip("PostgreSQL is not installed (.ci/ensure-services.sh): no database password to look for")
    assert "postgresql+asyncpg://postgres:***@" in tiled_log  # the start-up line, redacted
    for path in logs:
        assert PASSWORD not in path.read_text(errors="replace"), f"database password in {path.name}"


def test_logs_are_readable_by_their_owner_only(stack):
    cfg, _ = stack
    assert stat.S_IMODE((cfg.run_dir / "logs").stat().st_mode) == 0o700
    for path in (cfg.run_dir / "logs").iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path.name} has mode {oct(mode)}"


def _query(tiled: str, api_key: str | None, *, subprocess_: bool, capsys, monkeypatch) -> tuple[int, str]:
    """``phasestream query --tiled TILED`` with ``TILED_API_KEY=api_key``: exit status and stderr.

    In a subprocess (the real command: logging, tracebacks) or in this process (faster).
    """
    args = ["query", "--tiled", tiled, "--soc", "2.0"]
    if api_key is None:
        monkeypatch.delenv("TILED_API_KEY", raising=False)
    else:
        monkeypatch.setenv("TILED_API_KEY", api_key)
    if subprocess_:
        done = subprocess.run([sys.executable, "-m", "phasestream.app.cli", *args], capture_output=True, text=True,
                              timeout=120)
        return done.returncode, done.stderr
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


def test_tiled_errors_are_one_line_for_people(stack, capsys, monkeypatch):
    _, env = stack
    uri = env["TILED_URI"]
    wrong = "wrong" + os.urandom(4).hex()
    with refused_port() as port:  # nobody listens there while the cases run
        unreachable = f"http://127.0.0.1:{port}/api/v1"
        cases = [  # (--tiled, TILED_API_KEY, in a subprocess, the cause told)
            (uri, wrong, True, "rejected the API key (401"),
            (unreachable, env["TILED_API_KEY"], True, "cannot reach Tiled"),
            (uri, None, False, "requires an API key"),
            (f"{uri}?api_key={wrong}", None, False, "rejected the API key (401"),
        ]
        for tiled, key, in_subprocess, cause in cases:
            code, err = _query(tiled, key, subprocess_=in_subprocess, capsys=capsys, monkeypatch=monkeypatch)
            lines = err.strip().splitlines()
            assert code == 2, err
            assert len(lines) == 1 and lines[0].startswith("phasestream query: error: "), err
            assert cause in lines[0] and lines[0].endswith(f"(Tiled at {tiled.split('?')[0]})"), lines[0]
            assert wrong not in err and env["TILED_API_KEY"] not in err


def test_describe_tiled_error_names_cause_and_server_without_secrets():
    request = httpx.Request("GET", "http://tiled.example:8000/api/v1/metadata/x?api_key=Secret1")
    refused = httpx.HTTPStatusError("401", request=request, response=httpx.Response(401, request=request))
    text = describe_tiled_error(refused)
    assert text.startswith("Tiled refused the request (401 Unauthorized)")
    assert text.endswith("(Tiled at http://tiled.example:8000/api/v1/metadata/x)") and "Secret1" not in text
    gone = httpx.ConnectError("[Errno 111] Connection refused", request=request)
    assert describe_tiled_error(gone).startswith("cannot reach Tiled: ConnectError: [Errno 111]")
    not_found = httpx.HTTPStatusError("404", request=request, response=httpx.Response(404, request=request))
    assert describe_tiled_error(not_found) is None and describe_tiled_error(KeyError("x")) is None
