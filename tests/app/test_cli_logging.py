"""``-vv`` (debug logging) never shows the Tiled API key: the websocket and HTTP libraries' debug
lines carry the request headers, ``Authorization: Apikey ...`` among them."""

from __future__ import annotations

import logging

import pytest
from support import wait

from phasestream.app.cli.common import QUIET_AT_DEBUG, configure_logging
from phasestream.app.view.follow import CatalogFollower
from phasestream.store.tiled import separate_api_key


@pytest.fixture
def restored_levels():
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in QUIET_AT_DEBUG)]
    levels = [lg.level for lg in loggers]
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


def test_debug_logging_of_the_view_never_shows_the_api_key(tiled_server, tiled_client, restored_levels, caplog):
    uri, key = separate_api_key(tiled_server.uri)
    assert key
    configure_logging(2)
    with caplog.at_level(logging.DEBUG):
        follower = CatalogFollower(uri, api_key=key).start()
        try:
            wait(lambda: follower.state == "live", 60, "the view's follower never connected")
        finally:
            follower.close()
    assert "view: Tiled at" in caplog.text  # debug logging was on: phasestream's own lines are there
    assert key not in caplog.text
    for name in QUIET_AT_DEBUG:
        assert logging.getLogger(name).getEffectiveLevel() >= logging.INFO
