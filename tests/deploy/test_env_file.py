"""deploy/env/phasestream.env keeps its own rules: placeholders are visibly placeholders (CHANGEME, which
`phasestream config` flags) yet well-formed (letters and digits: Tiled refuses any other API key), and the
database password is written once (PGPASSWORD), in no URI."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

ENV = Path(__file__).resolve().parents[2] / "deploy" / "env" / "phasestream.env"


def _env() -> dict[str, str]:
    env = {}
    for line in ENV.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            assert key not in env, f"{key} is set twice"
            env[key.strip()] = value.strip()
    return env


def test_placeholders_are_letters_and_digits_and_say_changeme():
    env = _env()
    placeholders = {key for key, value in env.items() if "CHANGEME" in value}
    assert {"TILED_API_KEY", "PGPASSWORD"} <= placeholders
    for key in placeholders:
        assert re.fullmatch(r"[A-Za-z0-9]+", env[key]), key
    assert "CHANGE-ME" not in ENV.read_text()


def test_the_database_password_is_in_no_uri():
    env = _env()
    for key in ("PHASESTREAM_TILED_CATALOG", "PHASESTREAM_TILED_TABLES", "PHASESTREAM_REDIS", "TILED_URI"):
        parts = urlsplit(env[key])
        # no user either: Tiled makes `user@host` into user "user", password "None"
        assert parts.username is None and parts.password is None, key
    assert "${" not in "".join(env.values())  # systemd and honcho expand nothing in this file
