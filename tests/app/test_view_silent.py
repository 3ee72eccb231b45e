"""A result left ``running`` by a worker that died says so on the page, in a real browser.

The worker touches a running result's ``updated_at`` at least every ``--stop-timeout`` / 3; a result
untouched for longer belongs to no live run (docs/contract.md, "Recovery"). The page showed it as
``running`` for as long as no worker recovered it.
"""

from __future__ import annotations

import time
import uuid

import pytest
from support import wait
from view_support import chromium, missing, text_at

from phasestream.app.view import ViewServer

pytestmark = [pytest.mark.browser, pytest.mark.skipif(missing() is not None, reason=missing() or "")]


def test_a_running_result_without_updates_for_minutes_says_so(tiled_client):
    root = f"view-silent-{uuid.uuid4().hex[:8]}"
    container = tiled_client.create_container(root)
    for uid, age in (("dead-worker", 600.0), ("live-worker", 0.0), ("finished", 86400.0)):
        container.create_container(uid, specs=["PhaseMap"], metadata={
            "run_uid": uid, "sample": {"name": uid}, "state_of_charge": 2.0,
            "status": "complete" if uid == "finished" else "running", "errors": [], "n_energies_seen": 3,
            "references": {"phases": ["A", "B"]}, "phase_fractions": {"A": 0.25, "B": 0.75},
            "updated_at": time.time() - age})
    with ViewServer(tiled_client, root=root) as view, chromium() as driver:
        driver.get(f"{view.url}/#dead-worker")

        def status(uid: str) -> str:
            return text_at(driver, f'#runs tr[data-uid="{uid}"] td:nth-child(3)')

        wait(lambda: status("finished") == "complete", 30, "the results on the page")
        assert status("dead-worker") == "running, no update for 10 min"
        assert status("live-worker") == "running"
        assert text_at(driver, "#run-state") == "running, no update for 10 min"
