"""`phasestream up` / `status` / `down`, and the whole service end to end on PostgreSQL + Redis Tiled."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import psutil
import pytest
from bluesky import RunEngine
from services_support import (
    PORT_ATTEMPTS,
    free_port,
    postgres_bin,
    private_postgres,
    private_redis,
    redis_bin,
    stack_port_taken,
)

from phasestream.app.cli import main
from phasestream.app.stack import read_env
from phasestream.app.supervise import read_state
from phasestream.references import load_references, select_energies
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.catalog import find, wait_for_result
from phasestream.store.tiled import connect, raw_run_writer
from phasestream.transport.wire import DocumentPublisher

# the whole service started with `phasestream up`: `make test-stack` (in .ci/run), not `make test`
pytestmark = pytest.mark.stack

DEPLOY_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "tiled" / "config.yml"
ENERGIES = select_energies(load_references("nvpf-synthetic"), 5)
ARRAYS = ("od", "pcc", "phase", "reliability", "ambiguous", "mask")


def _ports() -> list[str]:
    names = ("--tiled-port", "--proxy-in-port", "--proxy-out-port", "--models-port", "--scheduler-port",
             "--view-port")
    return [arg for name in names for arg in (name, str(free_port()))]


def _up(args: list[str]) -> int:
    """``phasestream up ARGS`` on free ports; again on new ones when a component found its port taken.

    The stack's ports are fixed before it starts (its clients' environment file names them).
    """
    run_dir = Path(args[args.index("--run-dir") + 1])
    for _ in range(PORT_ATTEMPTS):
        shutil.rmtree(run_dir / "logs", ignore_errors=True)  # only this attempt's logs tell why it failed
        code = main([*args, *_ports()])
        if code == 0 or not stack_port_taken(run_dir):
            break
    return code


def _exited(pid: int) -> bool:
    """The process is gone (or has exited and waits to be collected)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _listening(address: str) -> bool:
    """Something accepts TCP connections at ``tcp://HOST:PORT`` or ``http://HOST:PORT[/PATH]``."""
    host, _, port = address.rpartition("//")[2].split("/")[0].rpartition(":")
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1.0):
        return True
    return False


def _status(run_dir, capsys) -> tuple[int, dict]:
    code = main(["status", "--run-dir", str(run_dir), "--json"])
    return code, json.loads(capsys.readouterr().out or "{}")


def _down_is_clean(run_dir, capsys, state: dict) -> None:
    assert main(["down", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "killed" not in out and out.count("stopped") == len(state)
    for record in state.values():
        assert _exited(record["pid"])
    assert main(["status", "--run-dir", str(run_dir)]) == 1  # nothing left to report
    capsys.readouterr()


def test_up_status_down_on_the_default_catalog(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["up", "--run-dir", str(run_dir), "--only", "tiled,proxy,scheduler,dask-workers", "--dask-workers", "1"]
    try:
        assert _up(args) == 0
        assert "all 4 components healthy" in capsys.readouterr().out
        code, state = _status(run_dir, capsys)
        assert code == 0 and set(state) == {"tiled", "proxy", "scheduler", "dask-workers", "supervisor"}
        assert all(r["healthy"] for r in state.values()), state
        env = read_env(run_dir)
        assert oct((run_dir / "phasestream.env").stat().st_mode & 0o777) == "0o600"
        client = connect(env["TILED_URI"], api_key=env["TILED_API_KEY"])
        client.create_container("written")  # the generated catalog is writable with the key
        assert "written" in client
        assert main([*args, *_ports()]) == 2  # a second `up` on the same run folder is refused
        assert "already running" in capsys.readouterr().err
        # people restart a component through the supervisor; it comes back healthy, counted
        old = state["proxy"]["pid"]
        assert main(["restart", "proxy", "--run-dir", str(run_dir)]) == 0, capsys.readouterr().err
        assert "healthy (restart 1)" in capsys.readouterr().out
        code, state = _status(run_dir, capsys)
        assert code == 0 and state["proxy"]["pid"] != old and _exited(old), state
        assert state["proxy"]["restarts"] == 1 and state["proxy"]["last_exit"] == "restart requested"
    finally:
        code, state = _status(run_dir, capsys)
        _down_is_clean(run_dir, capsys, state)


needs_services = pytest.mark.skipif(
    postgres_bin() is None or redis_bin() is None,
    reason="PostgreSQL and Redis binaries not installed (.ci/ensure-services.sh installs the Debian packages)")


@needs_services
def test_whole_service_on_postgres_and_redis(tmp_path, capsys, monkeypatch):
    import redis

    run_dir = tmp_path / "run"
    (tmp_path / "data").mkdir()
    (tmp_path / "detector").mkdir()
    with private_postgres() as pg, private_redis(tmp_path / "redis") as redis_uri:
        monkeypatch.setenv("PHASESTREAM_TILED_CATALOG", pg.replace("postgresql://", "postgresql+asyncpg://"))
        monkeypatch.setenv("PHASESTREAM_TILED_TABLES", pg)
        monkeypatch.setenv("PHASESTREAM_TILED_DATA", str(tmp_path / "data"))
        monkeypatch.setenv("PHASESTREAM_DETECTOR_FILES", str(tmp_path / "detector"))
        monkeypatch.setenv("PHASESTREAM_REDIS", redis_uri)
        monkeypatch.setenv("PHASESTREAM_OD_STORE", str(tmp_path / "od-store"))  # the worker's default --od-store
        monkeypatch.setenv("TILED_API_KEY", "e2e" + os.urandom(8).hex())
        try:
            assert _up(["up", "--run-dir", str(run_dir), "--tiled-config", str(DEPLOY_CONFIG), "--dask-workers",
                        "1", "--worker-arg=--no-refine", "--worker-arg=--backend=numba"]) == 0
            capsys.readouterr()
            code, state = _status(run_dir, capsys)
            assert code == 0, state
            assert set(state) == {"tiled", "proxy", "models", "scheduler", "dask-workers", "worker", "view",
                                  "supervisor"}
            assert "of 32 connections" in state["models"]["detail"], state["models"]  # serve-models' default
            env = read_env(run_dir)
            # the worker's post-scan jobs go to the stack's Dask scheduler
            ready = (run_dir / "logs" / "worker.log").read_text()
            assert f'"post_scan": "dask {env["PHASESTREAM_DASK_SCHEDULER"]}"' in ready
            client = connect(env["TILED_URI"], api_key=env["TILED_API_KEY"])

            # a live scan: raw run by TiledWriter, documents through the proxy to the worker process
            uid, sample, live = _scan(client, env, seed=4)
            assert live.metadata["status"] == "complete", live.metadata["errors"]
            assert sample.accuracy(live["phase"].read()) > 0.9
            (source,) = live["od"].data_sources()  # written by the worker, registered in Tiled
            assert source.management == "external" and (tmp_path / "od-store" / "phasestream" / uid).is_dir()
            before = {k: live[k].read() for k in ARRAYS}
            assert list(find(client, state_of_charge=2.0)) == [uid]  # JSONB query on PostgreSQL
            # the live view follows the catalog through the streaming cache in Redis
            deadline = time.monotonic() + 30
            while not any(r["uid"] == uid and r["status"] == "complete"
                          for r in httpx.get(f"{env['PHASESTREAM_VIEW']}api/state", timeout=5).json()["runs"]):
                assert time.monotonic() < deadline, "the view never showed the complete run"
                time.sleep(0.5)

            # with only the stack's env file sourced (no flags): query finds the run, and post-scan
            # reprocessing goes to the stack's Dask scheduler and gives the live numbers
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            assert main(["query", "--soc", "2.0", "--json"]) == 0
            assert [r["run_uid"] for r in json.loads(capsys.readouterr().out)] == [uid]
            code = main(["reprocess", "--soc", "2.0", "--backend", "numpy", "--replace"])
            out = capsys.readouterr().out
            assert code == 0, out
            assert f"{uid}: complete" in out and "1 of 1 runs complete" in out, out
            assert f"workers at {env['PHASESTREAM_DASK_SCHEDULER']})" in out, out
            after = client["phasestream"][uid]
            for k in ARRAYS:
                np.testing.assert_allclose(after[k].read(), before[k], atol=1e-5, equal_nan=True, err_msg=k)

            # the catalog is in PostgreSQL and Tiled's streaming cache in Redis
            assert redis.Redis.from_url(redis_uri).dbsize() > 0
            anonymous = httpx.get(f"{env['TILED_URI']}/metadata/{uid}", timeout=5)
            assert anonymous.status_code == 401  # no anonymous access, hence no anonymous writes

            # kill -9 of the worker: the supervisor starts it again at once, and the next scan completes
            killed = state["worker"]["pid"]
            os.kill(killed, signal.SIGKILL)
            t0 = time.monotonic()
            while (pid := read_state(run_dir)["components"]["worker"]["pid"]) == killed:
                assert time.monotonic() - t0 < 10, "the worker was not started again within 10 s"
                time.sleep(0.2)
            while not (_status(run_dir, capsys)[1]["worker"]["healthy"]):
                assert time.monotonic() - t0 < 120, "the restarted worker never became healthy"
                time.sleep(0.5)
            _, state = _status(run_dir, capsys)
            assert state["worker"]["pid"] == pid and state["worker"]["restarts"] == 1, state["worker"]
            _, sample2, live2 = _scan(client, env, seed=5)
            assert live2.metadata["status"] == "complete", live2.metadata["errors"]
            assert sample2.accuracy(live2["phase"].read()) > 0.9
        finally:
            code, state = _status(run_dir, capsys)
            _down_is_clean(run_dir, capsys, state)
        for record in state.values():
            if record["address"]:  # the supervisor listens nowhere
                assert not _listening(record["address"].split(" -> ")[0])


def _scan(client, env: dict, seed: int):
    """A live scan: raw run by TiledWriter, documents through the stack's proxy to its worker; the
    run's uid, sample and live result."""
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client))
    with DocumentPublisher(env["PHASESTREAM_ZMQ_IN"]) as publisher:
        assert publisher.wait_for_subscriber(20)
        RE.subscribe(publisher)
        sample = make_sample((40, 40), state_of_charge=2.0, seed=seed, n_particles=2)
        energy = make_energy()
        det = TransmissionDetector(sample, energy, i0=6000.0, seed=seed)
        (uid,) = RE(energy_stack_scan([det], energy, ENERGIES, sample=sample, i0_key=det.i0_key))
        return uid, sample, wait_for_result(client, uid, timeout=90.0)


def test_procfile_and_systemd_units_run_commands_phasestream_knows():
    """deploy/Procfile and the systemd units name real `phasestream` sub-commands and options."""
    import shlex

    from phasestream.app.cli import build_parser

    deploy = DEPLOY_CONFIG.parents[1]
    env = read_env(deploy / "env")  # deploy/env/phasestream.env
    assert env["TILED_URI"].endswith("/api/v1") and "PHASESTREAM_DASK_SCHEDULER" in env
    lines = [line.split(":", 1)[1] for line in (deploy / "Procfile").read_text().splitlines()
             if line and not line.startswith("#")]
    lines += [line.split("=", 1)[1] for unit in (deploy / "systemd").glob("*.service")
              for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 14
    parser = build_parser()
    for line in lines:
        expanded = re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], line)  # KeyError: a variable not in env
        words = shlex.split(expanded)
        if Path(words[0]).name == "phasestream":
            parser.parse_args(words[1:])  # SystemExit on an unknown option


def test_worker_of_the_stack_sends_post_scan_jobs_to_its_dask_scheduler(tmp_path, tiled_server, capsys,
                                                                         monkeypatch):
    """The worker that `up` starts says in its ready line where its post-scan jobs run."""
    monkeypatch.setenv("TILED_API_KEY", parse_qs(urlsplit(tiled_server.uri).query)["api_key"][0])
    # the worker says it is ready once connected to the proxy
    for components, expected in ((("proxy", "scheduler", "worker"), "dask"), (("proxy", "worker"), "thread")):
        run_dir = tmp_path / "-".join(components)
        try:
            assert _up(["up", "--run-dir", str(run_dir), "--tiled", tiled_server.uri, "--only", ",".join(components),
                        "--worker-arg=--no-refine", "--worker-arg=--backend=numpy"]) == 0, capsys.readouterr().err
            capsys.readouterr()
            log = (run_dir / "logs" / "worker.log").read_text()
            ready = json.loads(next(line for line in log.splitlines() if '"ready": true' in line))
            scheduler = read_env(run_dir)["PHASESTREAM_DASK_SCHEDULER"]
            assert ready["post_scan"] == (f"dask {scheduler}" if expected == "dask" else "thread"), ready
        finally:
            _, state = _status(run_dir, capsys)
            _down_is_clean(run_dir, capsys, state)
