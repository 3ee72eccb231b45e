"""deploy/Procfile started with honcho, as deploy/README.md says, on PostgreSQL + Redis: every process
starts at once (no ordering), the worker waits for Tiled instead of exiting, and a scan completes."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bluesky import RunEngine
from dotenv import dotenv_values
from services_support import free_port, postgres_bin, private_postgres, private_redis, redis_bin

from phasestream.references import load_references, select_energies
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.catalog import wait_for_result
from phasestream.store.tiled import connect, raw_run_writer
from phasestream.transport.wire import DocumentPublisher

pytestmark = [
    pytest.mark.stack,
    pytest.mark.skipif(postgres_bin() is None or redis_bin() is None,
                       reason="PostgreSQL and Redis not installed (.ci/ensure-services.sh installs them)"),
    pytest.mark.skipif(shutil.which("honcho", path=str(Path(sys.executable).parent)) is None,
                       reason="honcho not installed (the dev extra has it)"),
]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ENERGIES = select_energies(load_references("nvpf-synthetic"), 5)


def _env_file(tmp_path: Path, pg: str, redis_uri: str) -> tuple[Path, dict[str, str]]:
    """deploy/env/phasestream.env with this test's ports, folders, databases and a real key."""
    user_password, _, rest = pg.split("://", 1)[1].partition("@")
    password = user_password.partition(":")[2]
    host_port_db = rest
    ports = {name: free_port() for name in ("tiled", "in", "out", "models", "scheduler", "view")}
    for name in ("data", "detector", "od-store", "models"):
        (tmp_path / name).mkdir()
    values = {k: v for k, v in dotenv_values(DEPLOY / "env" / "phasestream.env").items() if v is not None}
    values.update({
        "TILED_URI": f"http://127.0.0.1:{ports['tiled']}/api/v1",
        "TILED_API_KEY": secrets.token_hex(16),
        "PHASESTREAM_TILED_PORT": str(ports["tiled"]),
        "PGUSER": "postgres",
        "PGPASSWORD": password,  # once: the URIs carry no credentials (deploy/env/phasestream.env)
        "PHASESTREAM_TILED_CATALOG": f"postgresql+asyncpg://{host_port_db}",
        "PHASESTREAM_TILED_TABLES": f"postgresql://{host_port_db}",
        "PHASESTREAM_TILED_DATA": str(tmp_path / "data"),
        "PHASESTREAM_DETECTOR_FILES": str(tmp_path / "detector"),
        "PHASESTREAM_OD_STORE": str(tmp_path / "od-store"),
        "PHASESTREAM_MODELS": str(tmp_path / "models"),
        "PHASESTREAM_REDIS": redis_uri,
        "PHASESTREAM_ZMQ_IN": f"tcp://127.0.0.1:{ports['in']}",
        "PHASESTREAM_ZMQ_OUT": f"tcp://127.0.0.1:{ports['out']}",
        "PHASESTREAM_MODEL_SERVER": f"tcp://127.0.0.1:{ports['models']}",
        "PHASESTREAM_DASK_SCHEDULER": f"tcp://127.0.0.1:{ports['scheduler']}",
        "PHASESTREAM_DASK_WORKERS": "1",
        "PHASESTREAM_VIEW_PORT": str(ports["view"]),
        "PHASESTREAM_BACKEND": "numba",
    })
    path = tmp_path / "phasestream.env"
    path.write_text("".join(f"{k}='{v}'\n" for k, v in values.items()))
    path.chmod(0o600)
    return path, values


def _ready_lines(log: Path, process: str) -> bool:
    """honcho prefixes each line with the time and ``NAME.1 |``."""
    return any(f" {process}.1 " in line and '"ready": true' in line
               for line in log.read_text(errors="replace").splitlines())


def test_procfile_with_honcho_comes_up_without_ordering_and_completes_a_scan(tmp_path):
    with private_postgres(password="pg" + secrets.token_hex(8)) as pg, \
            private_redis(tmp_path / "redis") as redis_uri:
        env_file, values = _env_file(tmp_path, pg, redis_uri)
        checked = subprocess.run([sys.executable, "-m", "phasestream.app.cli", "--config", str(env_file), "config"],
                                 capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                                      if not k.startswith(("TILED_", "PHASESTREAM_"))})
        assert checked.returncode == 0, checked.stdout + checked.stderr  # no placeholder, key well-formed
        assert values["TILED_API_KEY"] not in checked.stdout

        log = tmp_path / "honcho.log"
        bin_dir = str(Path(sys.executable).parent)  # the Procfile runs `phasestream` and `python` from PATH
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("TILED_", "PHASESTREAM_"))},
               "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
        with log.open("w") as out:
            honcho = subprocess.Popen([str(Path(bin_dir) / "honcho"), "-f", str(DEPLOY / "Procfile"), "-e",
                                       str(env_file), "-d", str(REPO), "--no-colour", "start"],
                                      stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            # the view, too, waits for Tiled instead of exiting (which would make honcho stop every process)
            while not all(_ready_lines(log, name) for name in ("worker", "models", "proxy", "view")):
                assert honcho.poll() is None, log.read_text()[-4000:]
                assert time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(1)
            client = connect(values["TILED_URI"], api_key=values["TILED_API_KEY"])
            RE = RunEngine({})
            RE.subscribe(raw_run_writer(client))
            with DocumentPublisher(values["PHASESTREAM_ZMQ_IN"]) as publisher:
                assert publisher.wait_for_subscriber(20)
                RE.subscribe(publisher)
                sample = make_sample((40, 40), state_of_charge=1.0, seed=7, n_particles=2)
                energy = make_energy()
                det = TransmissionDetector(sample, energy, i0=6000.0, seed=7)
                (uid,) = RE(energy_stack_scan([det], energy, ENERGIES, sample=sample, i0_key=det.i0_key))
                result = wait_for_result(client, uid, timeout=120.0)
            assert result.metadata["status"] == "complete", result.metadata["errors"]
            assert sample.accuracy(result["phase"].read()) > 0.9
            assert honcho.poll() is None  # nothing exited: honcho would have stopped every process
        finally:
            if honcho.poll() is None:
                os.killpg(honcho.pid, signal.SIGTERM)
                try:
                    honcho.wait(90)
                except subprocess.TimeoutExpired:
                    os.killpg(honcho.pid, signal.SIGKILL)
                    honcho.wait(10)
        for secret in (values["TILED_API_KEY"], values["PGPASSWORD"]):
            leaks = [line.replace(secret, "<SECRET>")[:200] for line in log.read_text(errors="replace").splitlines()
                     if secret in line]
            assert not leaks, leaks
