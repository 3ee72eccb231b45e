"""deploy/container: compose.yaml runs the launch commands (phasestream/app/launch.py), nothing listens beyond
what the env file says, and the image's entry points and every option the commands give exist (each
command's ``--help``, run as a plain process: no container runtime is needed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from phasestream.app.launch import DEPLOY_VARIABLES, SERVICES

ROOT = Path(__file__).resolve().parents[2]
CONTAINER = ROOT / "deploy" / "container"
NAMES = tuple(s.name for s in SERVICES)
BY_NAME = {s.name: s for s in SERVICES}
TILED_CONFIG = "/opt/phasestream/deploy/tiled/config.yml"
# compose fills ${NAME} from --env-file: the variables of deploy/env/phasestream.env
COMPOSE_VALUES = {"python": "python", "phasestream": "phasestream", "tiled_config": TILED_CONFIG,
                  **{key: "${" + name + "}" for key, name in DEPLOY_VARIABLES.items()}}
# the words before a command's first option: its program and subcommand(s)
PROGRAMS = {"python": [sys.executable], "phasestream": [sys.executable, "-m", "phasestream.app.cli"]}


def _compose() -> dict:
    return yaml.safe_load((CONTAINER / "compose.yaml").read_text())


def test_compose_runs_the_launch_commands():
    services = _compose()["services"]
    assert set(NAMES) <= set(services) and set(services) - set(NAMES) == {"postgres", "redis"}
    for name in NAMES:
        assert services[name]["command"] == BY_NAME[name].command(COMPOSE_VALUES, running=NAMES), name


def test_compose_services_bind_loopback_and_run_as_in_the_image():
    compose = _compose()
    for name, service in compose["services"].items():
        # host network: each process binds what the env file says (127.0.0.1); nothing is published
        assert service["network_mode"] == "host" and "ports" not in service, name
        if name in NAMES:
            assert service["image"] == "phasestream:cpu" and "user" not in service, name  # the image's user
            assert service["cap_drop"] == ["ALL"] and service["read_only"] is True, name
    assert "listen_addresses=127.0.0.1" in compose["services"]["postgres"]["command"]
    redis = compose["services"]["redis"]["command"]
    assert redis[redis.index("--bind") + 1] == "127.0.0.1"


def test_the_image_installs_where_the_commands_look_and_runs_as_a_user():
    text = (CONTAINER / "Containerfile").read_text()
    assert f"COPY deploy/tiled/config.yml {TILED_CONFIG}" in text
    assert "pip install -c constraints.txt \".[${EXTRAS}]\"" in text and "ARG EXTRAS=models" in text
    assert re.search(r"^USER phasestream$", text, re.M) and "FROM ${PYTHON_IMAGE} AS runtime" in text


@pytest.mark.parametrize("name", NAMES)
def test_the_entry_point_takes_every_option_the_command_gives(name):
    command = _compose()["services"][name]["command"]
    first_option = next(i for i, word in enumerate(command) if word.startswith("--"))
    argv = [*PROGRAMS[command[0]], *command[1:first_option], "--help"]
    if name == "tiled":  # `serve config` needs its file argument before --help would be read
        argv = [*PROGRAMS["python"], "-m", "tiled", "serve", "config", "--help"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    for option in (word for word in command if word.startswith("--")):
        assert option in result.stdout, f"{name}: {option} is not an option of {' '.join(command[:first_option])}"
