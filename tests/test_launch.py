"""The launch commands are written once (phasestream/app/launch.py): deploy/Procfile, every systemd
unit's ExecStart and `phasestream up` run exactly those commands, and nothing else."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from phasestream.app.launch import DEPLOY_VARIABLES, SERVICES, Service
from phasestream.app.stack import StackConfig, _commands, read_env

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
NAMES = tuple(s.name for s in SERVICES)
BY_NAME = {s.name: s for s in SERVICES}
# systemd unit -> service (the units keep their installed names)
UNITS = {"phasestream-tiled.service": "tiled", "phasestream-proxy.service": "proxy",
         "phasestream-models.service": "models", "phasestream-dask-scheduler.service": "scheduler",
         "phasestream-dask-worker.service": "dask-workers", "phasestream-worker.service": "worker",
         "phasestream-view.service": "view"}
SYSTEMD_PREFIX = "/opt/phasestream"


def _deploy_values(variable: str, *, python: str, phasestream: str, tiled_config: str) -> dict[str, str]:
    """Placeholder values of a deploy file whose variables read ``variable % NAME`` ($NAME, ${NAME})."""
    return {"python": python, "phasestream": phasestream, "tiled_config": tiled_config,
            **{key: variable % name for key, name in DEPLOY_VARIABLES.items()}}


PROCFILE_VALUES = _deploy_values("$%s", python="python", phasestream="phasestream",
                                 tiled_config="deploy/tiled/config.yml")
SYSTEMD_VALUES = _deploy_values("${%s}", python=f"{SYSTEMD_PREFIX}/.venv/bin/python",
                                phasestream=f"{SYSTEMD_PREFIX}/.venv/bin/phasestream",
                                tiled_config=f"{SYSTEMD_PREFIX}/deploy/tiled/config.yml")


def _procfile() -> dict[str, list[str]]:
    lines = [line for line in (DEPLOY / "Procfile").read_text().splitlines() if line and not line.startswith("#")]
    entries = [line.split(":", 1) for line in lines]
    procfile = {name.strip(): shlex.split(command) for name, command in entries}
    assert len(procfile) == len(lines), "a process name appears twice in deploy/Procfile"
    return procfile


def _unit(path: Path) -> dict[str, list[str]]:
    """``{key: [values]}`` of a systemd unit file (keys may repeat)."""
    unit: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", ";", "[")):
            unit.setdefault(key.strip(), []).append(value.strip())
    return unit


def test_procfile_runs_the_launch_commands():
    procfile = _procfile()
    assert tuple(procfile) == NAMES  # every service, in start order, and nothing else
    for name, words in procfile.items():
        assert words == BY_NAME[name].command(PROCFILE_VALUES, running=NAMES), name


def test_systemd_units_run_the_launch_commands_after_what_they_need():
    units = {path.name: _unit(path) for path in sorted((DEPLOY / "systemd").glob("*.service"))}
    assert set(units) == set(UNITS)
    target = _unit(DEPLOY / "systemd" / "phasestream.target")
    assert set(" ".join(target["Wants"]).split()) == set(UNITS)
    unit_of = {service: unit for unit, service in UNITS.items()}
    for unit_name, unit in units.items():
        service = BY_NAME[UNITS[unit_name]]
        (exec_start,) = unit["ExecStart"]
        assert shlex.split(exec_start) == service.command(SYSTEMD_VALUES, running=NAMES), unit_name
        # started after the services whose addresses it names, and only those of ours
        expected = {unit_of[other] for other in (*service.needs, *(other for other, _ in service.uses))}
        for key in ("After", "Wants"):
            ours = {word for word in " ".join(unit[key]).split() if word.startswith("phasestream")}
            assert ours == expected, (unit_name, key)


def test_deploy_variables_are_those_of_the_env_file():
    env = read_env(DEPLOY / "env")  # deploy/env/phasestream.env
    assert set(DEPLOY_VARIABLES.values()) <= set(env)
    procfile_text = (DEPLOY / "Procfile").read_text()
    assert set(re.findall(r"\$(\w+)", procfile_text)) <= set(env)


def test_start_order_respects_needs():
    for i, service in enumerate(SERVICES):
        earlier = set(NAMES[:i])
        assert set(service.needs) <= earlier and {other for other, _ in service.uses} <= earlier, service.name


def test_phasestream_up_with_defaults_runs_what_the_procfile_runs(tmp_path):
    """`up`'s commands, its defaults filled in, are the Procfile's with deploy/env/phasestream.env's values."""
    env = read_env(DEPLOY / "env")
    cfg = StackConfig(run_dir=tmp_path, tiled_config=DEPLOY / "tiled" / "config.yml").validate()
    programs = {(sys.executable, "-m", "phasestream.app.cli"): ["phasestream"], (sys.executable,): ["python"]}
    for name, command in _commands(cfg).items():
        service = BY_NAME[name]
        command = command[: len(command) - len(service.run_dir_args)]
        for program, short in programs.items():
            if tuple(command[: len(program)]) == program:
                command = short + command[len(program):]
                break
        expected = [re.sub(r"\$(\w+)", lambda m: env[m.group(1)], word) for word in _procfile()[name]]
        expected = [str(cfg.tiled_config) if word == "deploy/tiled/config.yml" else word for word in expected]
        assert command == expected, name


def test_up_adds_run_folder_files_extra_arguments_and_the_services_it_runs(tmp_path):
    cfg = StackConfig(run_dir=tmp_path, components=("tiled", "proxy", "worker"), worker_args=("--no-refine",),
                      ).validate()
    commands = _commands(cfg)
    assert commands["tiled"][-2] == "--log-config" and Path(commands["tiled"][-1]).is_file()
    worker = commands["worker"]
    assert worker[-1] == "--no-refine" and "--models" not in worker and "--scheduler" not in worker
    assert commands["proxy"][1:] == ["-m", "phasestream.app.cli", "proxy", "--in", cfg.zmq_in, "--out", cfg.zmq_out]


def test_a_command_names_the_placeholder_it_lacks():
    service = Service("demo", ("{python}", "-m", "x", "--at", "{host}:{port}"))
    assert service.command({"python": ["py", "-X", "dev"], "host": "h", "port": 1}) == ["py", "-X", "dev", "-m", "x",
                                                                                        "--at", "h:1"]
    with pytest.raises(ValueError, match=r"service demo: no value for \{port\}"):
        service.command({"python": "py", "host": "h"})
