"""`phasestream up` / `down` and their supervisor trust only what they started and what only their user
may write: a recorded pid counts as the stack's process only while its start time and command line are
the ones recorded; secrets files and ``stack.json`` are written private (0600), never through a symbolic
link, in a run folder nobody else may write; no key lands in ``stack.json``; URI passwords and
``password=``/``api_key=``-like query parameters are masked in the Tiled log filter, exception text
included; port options are in range and distinct.

Fast: real child processes started here, the functions of ``phasestream.app.stack`` and ``supervise``
called directly, ``up`` with no component (no server starts).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phasestream.app import supervise
from phasestream.app.cli import build_parser
from phasestream.app.stack import RedactSecrets, StackConfig, _write_env, down, up
from phasestream.app.supervise import Supervisor, read_state, request_restart, write_state

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
# a process that says when it got SIGTERM and keeps running (a user's shell, a daemon)
STUBBORN = [sys.executable, "-c", "import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: (sys.stdout.write('SIGTERM\\n'), sys.stdout.flush()))\n"
            "print('ready', flush=True)\ntime.sleep(600)"]


@pytest.fixture
def processes():
    """Start processes in their own process group (as ``up`` does); all are killed after the test."""
    started: list[subprocess.Popen] = []

    def start(command: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, text=True)
        started.append(proc)
        if command is STUBBORN:
            assert proc.stdout.readline().strip() == "ready"  # its SIGTERM handler is in place
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    return path


def _write_stack(run_dir: Path, **components: dict) -> None:
    state = {"config": {}, "components": {name: {"log": str(run_dir / f"{name}.log"), "address": "",
                                                 "restarts": 0, **record} for name, record in components.items()}}
    (run_dir / "stack.json").write_text(json.dumps(state))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# --------------------------------------------------------------------------- 1. recorded pids


def test_down_leaves_alone_a_process_that_now_holds_a_recorded_pid(run_dir, processes):
    stranger = processes(STUBBORN)  # after a reboot or a crash, the recorded pid is someone else's
    # a record of an earlier version (no identity), started before the stranger was
    _write_stack(run_dir, proxy={"pid": stranger.pid, "command": ["phasestream", "proxy"],
                                 "started": time.time() - 86400})
    assert down(run_dir, timeout=1) == {"proxy": "stale"}
    time.sleep(0.2)
    assert stranger.poll() is None, "down signalled a process the stack never started"
    assert not (run_dir / "stack.json").exists()  # the stale record is dropped


def test_a_recorded_pid_counts_only_while_its_start_time_and_boot_match(run_dir, processes):
    ours = processes(SLEEPER)
    identity = supervise.process_identity(ours.pid)
    assert identity["start_time"] > 0
    assert supervise.is_running({"pid": ours.pid, "identity": identity})
    for other in ({**identity, "start_time": identity["start_time"] + 1}, {**identity, "boot_id": "another boot"}):
        assert not supervise.is_running({"pid": ours.pid, "identity": other})
    stranger = processes(STUBBORN)  # the same pid with another start time: what a stale stack.json gives
    _write_stack(run_dir, proxy={"pid": stranger.pid, "command": STUBBORN,
                                 "identity": {**supervise.process_identity(stranger.pid), "start_time": 1}})
    assert down(run_dir, timeout=1) == {"proxy": "stale"} and stranger.poll() is None
    _write_stack(run_dir, proxy={"pid": ours.pid, "command": SLEEPER, "identity": identity})
    assert down(run_dir, timeout=5) == {"proxy": "stopped"}
    ours.wait(5)  # down collected its exit status: it is gone
    assert not supervise.is_running({"pid": ours.pid, "identity": identity})


def test_a_record_of_an_earlier_version_is_its_process_while_it_started_then(run_dir, processes):
    """Records written before the start time was kept have ``started`` only: ``down`` after an upgrade left the
    running supervisor and components of such a stack alone ("stale"), to go on restarting what it stopped."""
    ours = processes(SLEEPER)
    record = {"pid": ours.pid, "command": SLEEPER, "started": time.time()}
    assert supervise.is_running(record)
    assert not supervise.is_running({**record, "started": time.time() - 3600})
    _write_stack(run_dir, proxy=record)
    assert down(run_dir, timeout=5) == {"proxy": "stopped"}
    ours.wait(5)


def test_a_program_that_rewrites_its_command_line_is_still_its_process(run_dir, processes):
    """Dask's scheduler rewrites its command line (``setproctitle``): compared, it read as stale, and ``down`` left
    it holding its port."""
    ours = processes([sys.executable, "-c",
                      "import os, time; time.sleep(0.3); os.execv('/bin/sleep', ['sleep', '60'])"])
    identity = supervise.process_identity(ours.pid)
    before = (Path("/proc") / str(ours.pid) / "cmdline").read_bytes()
    time.sleep(0.8)  # the same process (pid, start time) with another command line
    assert (Path("/proc") / str(ours.pid) / "cmdline").read_bytes() != before
    assert supervise.is_running({"pid": ours.pid, "identity": identity})


def test_up_starts_over_a_stale_stack_record(run_dir, processes):
    stranger = processes(STUBBORN)
    _write_stack(run_dir, proxy={"pid": stranger.pid, "command": ["phasestream", "proxy"],
                                 "started": time.time() - 86400})
    up(StackConfig(run_dir=run_dir, components=(), supervise=False))  # no component: nothing starts
    assert read_state(run_dir)["components"] == {} and stranger.poll() is None


def test_the_supervisor_restarts_a_component_whose_pid_a_stranger_took(run_dir, processes):
    stranger = processes(STUBBORN)
    _write_stack(run_dir, proxy={"pid": stranger.pid, "command": SLEEPER, "started": 0,
                                 "identity": {**supervise.process_identity(stranger.pid), "start_time": 1}})
    request_restart(run_dir, "proxy")  # `phasestream restart proxy`: must not signal the stranger
    sup = Supervisor(run_dir)
    try:
        sup.step()
        record = read_state(run_dir)["components"]["proxy"]
        assert record["pid"] != stranger.pid and record["restarts"] == 1
        assert supervise.is_running(record) and record["command"] == SLEEPER
    finally:
        for child in sup.children.values():
            child.kill()
            child.wait(10)
    assert select.select([stranger.stdout], [], [], 0.3)[0] == [], "the stranger got a signal"
    assert stranger.poll() is None


# --------------------------------------------------------------------------- 2. and 3. private files


def test_the_env_file_replaces_a_world_readable_one_with_a_private_file(run_dir):
    old = run_dir / "phasestream.env"
    old.write_text("# an earlier copy\n")
    old.chmod(0o644)
    _write_env(StackConfig(run_dir=run_dir).validate(), "Key0123")
    assert _mode(old) == 0o600 and "TILED_API_KEY=Key0123" in old.read_text()


def test_the_env_file_and_stack_json_never_follow_a_symbolic_link(run_dir, tmp_path):
    loot = tmp_path / "loot.txt"
    loot.write_text("")
    (run_dir / "phasestream.env").symlink_to(loot)
    (run_dir / "stack.json.tmp").symlink_to(loot)  # the temporary name write_state used
    _write_env(StackConfig(run_dir=run_dir).validate(), "Key0123")
    write_state(run_dir, {"components": {}, "secret": "Key0123"})
    assert loot.read_text() == ""
    for name in ("phasestream.env", "stack.json"):
        path = run_dir / name
        assert not path.is_symlink() and _mode(path) == 0o600 and "Key0123" in path.read_text()


def test_up_refuses_a_run_dir_others_may_write_or_that_is_not_its_users(run_dir, monkeypatch):
    run_dir.chmod(0o777)
    with pytest.raises(RuntimeError, match=rf"{re.escape(str(run_dir))}.*writ.*chmod"):
        up(StackConfig(run_dir=run_dir, components=(), supervise=False, env={"TILED_API_KEY": "Key0123"}))
    assert not (run_dir / "phasestream.env").exists()
    run_dir.chmod(0o700)
    owner = run_dir.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
    with pytest.raises(RuntimeError, match=rf"{re.escape(str(run_dir))}.*not owned by"):
        up(StackConfig(run_dir=run_dir, components=(), supervise=False, env={"TILED_API_KEY": "Key0123"}))


def test_up_creates_a_private_run_dir_and_records_no_api_key(tmp_path):
    run_dir = tmp_path / "new" / "run"
    key = "Secret" + os.urandom(6).hex()
    cfg = StackConfig(run_dir=run_dir, components=(), supervise=False,
                      tiled_uri=f"http://127.0.0.1:1/api/v1?api_key={key}")
    up(cfg)
    assert _mode(run_dir) == 0o700
    state = run_dir / "stack.json"
    assert _mode(state) == 0o600 and key not in state.read_text()
    assert json.loads(state.read_text())["config"]["tiled_uri"] == "http://127.0.0.1:1/api/v1"
    env = (run_dir / "phasestream.env").read_text()
    assert f"TILED_API_KEY={key}\n" in env and "api_key=" not in env  # the URI's key, beside the URI
    assert down(run_dir) == {}


# --------------------------------------------------------------------------- 4. and 5. the Tiled log filter


@pytest.mark.parametrize(("text", "secret", "kept"), [
    ("catalog postgresql://tiled@db:5432/x?password=QuerySecret1&sslmode=require", "QuerySecret1",
     "postgresql://tiled@db:5432/x?password=***&sslmode=require"),
    ("cache redis://:Red@isPw2@h:6379/0 up", "isPw2", "redis://:***@h:6379/0 up"),
    ("'postgresql+asyncpg://tiled:Db@Secret9@db/tiled'", "Secret9", "'postgresql+asyncpg://tiled:***@db/tiled'"),
    ('"GET /api/v1/metadata/?api_key=Key99&x=1 HTTP/1.1" 200', "Key99", "/api/v1/metadata/?api_key=***&x=1 HTTP"),
    ("https://h/x?access_token=Tok77#frag", "Tok77", "https://h/x?access_token=***#frag"),
    ("dsn host=db user=tiled password=Dsn55 dbname=x", "Dsn55", "password=*** dbname=x"),
])
def test_the_tiled_log_filter_masks_passwords_and_keys_wherever_they_are(text, secret, kept):
    shown = RedactSecrets.redact(text)
    assert secret not in shown and kept in shown


def test_the_tiled_log_filter_masks_exception_text_and_stacks():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactSecrets())
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("tiled.trust-test")
    log.addHandler(handler)
    log.propagate = False
    try:
        try:
            raise ValueError("Could not parse SQLAlchemy URL 'postgresql+asyncpg://tiled:DbSecret9@db/tiled'")
        except ValueError:
            log.exception("catalog failed")
        log.warning("at redis://:StackPw3@h:6379", stack_info=True)
    finally:
        log.removeHandler(handler)
    text = out.getvalue()
    assert "DbSecret9" not in text and "StackPw3" not in text
    assert "Traceback (most recent call last)" in text and "ValueError: Could not parse" in text
    assert "tiled:***@db/tiled" in text and "Stack (most recent call last)" in text


# --------------------------------------------------------------------------- 6. ports


@pytest.mark.parametrize("value", ["70000", "0", "-1"])
def test_up_refuses_a_port_out_of_range_naming_the_option(value, capsys):
    with pytest.raises(SystemExit):
        build_parser(("up",)).parse_args(["up", "--proxy-in-port", value])
    assert "--proxy-in-port" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"proxy_in_port.*--proxy-in-port.*1 to 65535"):
        StackConfig(proxy_in_port=int(value)).validate()


def test_up_refuses_two_services_on_one_port_naming_both_options():
    with pytest.raises(ValueError, match=r"--proxy-out-port.*--models-port.*5579"):
        StackConfig(proxy_out_port=5579).validate()
    # a port of a component that does not start does not count
    StackConfig(components=("proxy",), models_port=5577).validate()
    StackConfig(components=("proxy", "models"), tiled_port=5577).validate()
