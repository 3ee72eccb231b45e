"""``phasestream view`` survives Tiled restarting, and shows why a scan ended partial or failed.

A real ``tiled serve catalog`` process (SQLite catalog on disk, memory streaming cache) is killed
and started again under the open page: the page says "reconnecting" meanwhile, then catches up
(a result written right after the restart appears) with no reload.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from services_support import uvicorn_port
from view_support import attributes_at, chromium, click, missing, text_at

from phasestream.app.view import ViewServer
from phasestream.store.tiled import connect

pytestmark = [pytest.mark.browser, pytest.mark.skipif(missing() is not None, reason=missing() or "")]


class TiledProcess:
    """``tiled serve config`` (SQLite catalog, memory streaming cache) on a folder that outlives the process.

    Not ``tiled serve catalog --cache memory``: in Tiled 0.2.20 that option fails at start-up
    (``UnboundLocalError: StreamingCacheConfig``), and without it ``serve catalog`` has no streaming.
    """

    def __init__(self, folder: Path):
        self.folder, self.key, self.port, self.proc = folder, secrets.token_hex(16), 0, None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> TiledProcess:
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        config = self.folder / "config.yml"
        config.write_text(yaml.safe_dump({
            "authentication": {"single_user_api_key": "${TILED_API_KEY}", "allow_anonymous_access": False},
            "catalog": {"uri": f"sqlite:///{self.folder / 'catalog.db'}", "init_if_not_exists": True,
                        "writable_storage": [str(self.folder / "data")]},
            "streaming_cache": {"uri": "memory"}}))
        log = self.folder / "tiled.log"
        offset = log.stat().st_size if log.exists() else 0
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "tiled"), "serve", "config", str(config), "--host", "127.0.0.1",
             "--port", str(self.port)],
            stdout=log.open("a"), stderr=subprocess.STDOUT, env={**os.environ, "TILED_API_KEY": self.key})
        self.port = uvicorn_port(log, self.proc, offset=offset)
        return self

    def client(self):
        return connect(self.uri, api_key=self.key)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)


def result(client, uid: str, status: str, errors: list[str]) -> None:
    root = client["phasestream"] if "phasestream" in client else client.create_container("phasestream")
    root.create_container(uid, specs=["PhaseMap"], metadata={
        "run_uid": uid, "sample": {"name": uid}, "state_of_charge": 2.0, "status": status, "errors": errors,
        "n_energies_seen": 3, "references": {"name": "nvpf-synthetic", "phases": ["Na3.0", "Na2.0"]},
        "phase_fractions": {"Na3.0": 0.25, "Na2.0": 0.75}, "ambiguous_fraction": 0.0, "refined_fractions": {},
        "updated_at": time.time()})


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_view_shows_errors_and_survives_tiled_restarting(tmp_path):
    tiled = TiledProcess(tmp_path / "tiled").start()
    try:
        result(tiled.client(), "failed-run", "failed", ["start document refused: num_points 20000 > 10000"])
        with ViewServer(f"{tiled.uri}?api_key={tiled.key}") as view, chromium() as driver:
            driver.get(f"{view.url}/#failed-run")
            badge = lambda: text_at(driver, "#connection")  # noqa: E731
            wait(lambda: badge() == "live", 30, "the view to be live")
            assert httpx.get(f"{view.url}/healthz").json() == {"ok": True, "state": "live"}
            wait(lambda: "num_points 20000" in (text_at(driver, "#run-errors") or ""), 10, "the run's errors")
            driver.execute_script("window.notReloaded = true")

            tiled.stop(signal.SIGKILL)
            wait(lambda: badge() == "reconnecting", 30, "the page to say reconnecting")
            health = httpx.get(f"{view.url}/healthz")  # phasestream status: unhealthy while Tiled is away
            assert health.status_code == 503 and health.json()["state"] == "reconnecting"
            tiled.start()
            result(tiled.client(), "partial-run", "partial", ["worker stopped"])
            wait(lambda: driver.find_elements("css selector", '#runs tr[data-uid="partial-run"]'), 60,
                 "the result written after the restart on the page")
            wait(lambda: badge() == "live", 30, "the view to be live again")
            assert driver.execute_script("return window.notReloaded") is True
            click(driver, '#runs tr[data-uid="partial-run"]')
            wait(lambda: "worker stopped" in (text_at(driver, "#run-errors") or ""), 10, "the partial run's errors")
            assert tiled.key not in driver.page_source

            # the search is phasestream query's: status failed lists the failed run only
            click(driver, '#q-status option[value="failed"]')
            click(driver, '#search button[type="submit"]')
            wait(lambda: attributes_at(driver, "#runs tr", "data-uid") == ["failed-run"], 10,
                 "the search to list the failed run only")
    finally:
        tiled.stop()
