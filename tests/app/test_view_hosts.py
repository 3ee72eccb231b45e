"""The view on loopback answers only requests addressed to a loopback name: a page whose own name was
rebound to 127.0.0.1 (DNS rebinding) cannot read the results through a visitor's browser."""

from __future__ import annotations

import httpx
import pytest

from phasestream.app.view import ViewServer
from phasestream.app.view.server import allowed_hosts


def test_allowed_hosts():
    assert allowed_hosts("127.0.0.1") == ["127.0.0.1", "localhost"]
    assert allowed_hosts("localhost", ["view.beamline.example"]) == ["127.0.0.1", "localhost", "view.beamline.example"]
    assert allowed_hosts("0.0.0.0") == ["*"]  # --public: reached by names not known here


@pytest.mark.parametrize(("host", "status"), [
    (None, 200),  # the URL's own 127.0.0.1:port
    ("localhost:8010", 200),
    ("attacker.example", 400),
    ("attacker.example:8010", 400),
    ("127.0.0.1.attacker.example", 400),
])
def test_the_view_answers_only_loopback_names(tiled_client, host, status):
    with ViewServer(tiled_client, root="view-hosts") as view, httpx.Client(base_url=view.url, timeout=30) as http:
        headers = {} if host is None else {"Host": host}
        for path in ("/api/state", "/healthz", "/"):
            reply = http.get(path, headers=headers)
            expected = status if path != "/healthz" or status == 400 else reply.status_code  # 503 until live
            assert reply.status_code == expected, (path, host, reply.status_code)
            if status == 400:
                assert "runs" not in reply.text
