"""``phasestream view`` in a real browser during a real scan: the real worker, 0MQ proxy and Tiled.

A headless Chromium (selenium, the system chromedriver) opens the view while a 48x48 scan of 8
energies goes through ``phasestream serve``; the page must follow it through Tiled's streaming
alone (no reload): the energies-seen counter steps up, the phase image changes between a partial
and the final map, the final fractions equal the result metadata in Tiled, and the API key is
nowhere in the page. With ``PHASESTREAM_SCREENSHOTS=DIR`` the test saves view-running.png and
view-finished.png there (the README's screenshots: ``PHASESTREAM_SCREENSHOTS=docs/img``).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from support import recorded_scan, wait
from view_support import IMAGE_DATA, chromium, missing, text_at

from phasestream.app.live import ServeProcess
from phasestream.app.view import ViewServer
from phasestream.references import load_references, select_energies
from phasestream.store.tiled import separate_api_key
from phasestream.transport.proxy import start_proxy
from phasestream.transport.wire import DocumentPublisher

ENERGIES = select_energies(load_references("nvpf-synthetic"), 8)
SHAPE = (48, 48)
PACE = 0.7  # s between images: longer than the worker's min_update_seconds (0.5), so partial maps appear

pytestmark = [pytest.mark.browser, pytest.mark.skipif(missing() is not None, reason=missing() or "")]


MAPS_DRAWN = """
const run = window.phasestreamView.runs.get(arguments[0]);
const last = window.phasestreamLog.filter((e) => e.uid === arguments[0]).pop();
return !!(run && last && last.drawn && last.version === run.version);
"""


def scan_documents(client, *, seed: int = 5, state_of_charge: float = 2.0):
    """A simulated scan whose raw run TiledWriter stores; its documents, to publish paced."""
    return recorded_scan(client, ENERGIES, shape=SHAPE, seed=seed, state_of_charge=state_of_charge)[0]




def test_view_follows_a_real_scan_in_a_browser(tiled_server, tiled_client):
    _, key = separate_api_key(tiled_server.uri)
    docs = scan_documents(tiled_client)
    uid = docs[0][1]["uid"]
    shots = os.environ.get("PHASESTREAM_SCREENSHOTS")
    with start_proxy() as proxy, DocumentPublisher(proxy.in_address) as publisher, \
            ServeProcess(proxy.out_address, tiled_server.uri,
                         args=("--backend", "numpy", "--no-refine", "--update-every", "1", "--update-seconds", "0.2",
                               "--partial-budget", "none")), \
            ViewServer(tiled_server.uri) as view, chromium() as driver:
        assert publisher.wait_for_subscriber(10)
        driver.get(f"{view.url}/#{uid}")
        wait(lambda: text_at(driver, "#connection") == "live", 30, "the view to be live")

        sender = threading.Thread(target=lambda: [(publisher(n, d), time.sleep(PACE if n == "event" else 0))
                                                  for n, d in docs], daemon=True)
        sender.start()
        deadline = time.monotonic() + 180
        seen: list[str] = []
        partial_image, shot_running = None, False
        while sender.is_alive() or text_at(driver, "#run-state") in (None, "", "running"):
            energies = text_at(driver, "#run-energies")
            if energies and (not seen or seen[-1] != energies):
                seen.append(energies)
            state = text_at(driver, "#run-state")
            if state == "running" and energies and 2 <= int(energies.split("/")[0]) < len(ENERGIES):
                image = driver.execute_script(IMAGE_DATA, "img-phase")
                if image and partial_image is None:
                    partial_image = image
                if shots and not shot_running and int(energies.split("/")[0]) >= len(ENERGIES) - 3 \
                        and driver.execute_script(MAPS_DRAWN, uid):  # the page's maps are those of its metadata
                    shot_running = driver.save_screenshot(str(Path(shots) / "view-running.png"))
            assert time.monotonic() < deadline, f"the scan never finished on the page; energies seen {seen}"
            time.sleep(0.2)
        sender.join()

        md = dict(tiled_client["phasestream"][uid].metadata)
        wait(lambda: text_at(driver, "#run-state") == md["status"], 30, "the final status on the page")
        assert md["status"] == "complete", md["errors"]
        if text_at(driver, "#run-energies") != seen[-1]:
            seen.append(text_at(driver, "#run-energies"))
        counts = [int(s.split("/")[0]) for s in seen]
        assert counts == sorted(counts) and len(set(counts)) >= 3, f"energies seen did not step up: {seen}"
        assert seen[-1] == f"{len(ENERGIES)}/{len(ENERGIES)}"
        log = (driver.execute_script("return window.phasestreamLog"), driver.get_log("browser"))
        assert partial_image is not None, f"no partial phase map was shown; energies seen {seen}; {log}"

        def final_image():
            version = driver.execute_script("return window.phasestreamView.drawnVersion[arguments[0]]", uid)
            entries = driver.execute_script("return window.phasestreamLog", )
            drawn = [e for e in entries if e["uid"] == uid and e["version"] == version and e["drawn"]]
            return drawn and driver.execute_script(IMAGE_DATA, "img-phase")

        assert wait(final_image, 20, "the final phase map drawn") != partial_image
        fractions = {row.get_attribute("data-phase"): float(row.get_attribute("data-fraction"))
                     for row in driver.find_elements("css selector", "#fractions tr.fraction")}
        assert fractions == md["phase_fractions"]
        row = text_at(driver, f'#runs tr[data-uid="{uid}"]')
        assert f"{len(ENERGIES)}/{len(ENERGIES)}" in row and "complete" in row
        if shots:
            driver.save_screenshot(str(Path(shots) / "view-finished.png"))
        assert key and key not in driver.page_source
        for link in driver.find_elements("css selector", "#links a"):
            assert key not in link.get_attribute("href")
