"""The supervisor of ``phasestream up``: a component that dies is started again.

``up`` starts the components, then this supervisor (``python -m phasestream.app.supervise
RUN_DIR``, its own process group, recorded as ``supervisor`` in ``RUN_DIR/stack.json``, its log
``RUN_DIR/logs/supervisor.log``). Every ``POLL`` seconds it looks at each component's process; one
that is gone is started again with the same command, environment and log, after a delay that
grows with each death in a row (at once, then 1 s, 2 s, 4 s ... at most 30 s; a component that
stayed up a minute starts again at once). Each restart is counted in the component's record (``restarts``,
``last_exit``, ``last_restart``) and shown by ``phasestream status``.

``phasestream restart NAME`` asks for a restart: it leaves ``RUN_DIR/restart-NAME`` and stops the
component (SIGTERM to its process group); the supervisor starts it again at once. ``phasestream
down`` stops the supervisor first, so nothing is restarted while the stack stops.

The supervisor restarts dead processes only: a live component that fails its health check is
reported by ``status``, not killed.

A recorded pid is the component's process only while it is :func:`is_running`: the process with that
pid started at the recorded time (``/proc/PID/stat``, field 22), in the same boot. Its command line is
not compared: a program may rewrite it (Dask's scheduler does, with ``setproctitle``). After a reboot or
a crash the pid may be another program's, which is neither signalled nor counted as the component
(``down`` reports it ``stale``; the supervisor starts the component again). A record of an earlier
version, without the start time, matches a process that started within seconds of its ``started``.
Without ``/proc`` (not Linux) the pid alone tells, as it did before.

``stack.json`` is written by :func:`write_private`: mode 0600, through a new file renamed over it,
never through a symbolic link.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["POLL", "alive", "is_running", "launch", "process_identity", "read_state", "request_restart",
           "started_identity", "supervise", "write_private", "write_state"]

logger = logging.getLogger("phasestream.supervise")

POLL = 0.5
FIRST_DELAY, MAX_DELAY, STABLE_AFTER = 1.0, 30.0, 60.0
STOP_GRACE = 30.0  # seconds a component may take to stop after a requested restart
PROC = Path("/proc")


def read_state(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "stack.json").read_text())


def write_state(run_dir: Path, state: dict) -> None:
    """Replace ``stack.json`` at once (a reader never sees half a file), readable by its owner only."""
    write_private(Path(run_dir) / "stack.json", json.dumps(state, indent=2))


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` at once by a file of mode 0600 holding ``text``.

    The text goes to a new file beside ``path`` (a random name, created exclusively and never through a
    symbolic link), which is then renamed over ``path``: a file left there with a wider mode, or a
    symbolic link to someone else's file, is replaced, never written to.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with open(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _open_log(path: Path) -> int:
    """A file descriptor appending to ``path``, a file only its owner may read (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)  # also when an older log was created with a wider mode
    return fd


def launch(command: list[str], log: Path, env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen, int]:
    """Start ``command`` in its own process group, appending to ``log``; the process and the log's
    size before it (what the process writes starts there)."""
    fd = _open_log(log)
    offset = os.fstat(fd).st_size
    with open(fd, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, cwd=cwd)
    return proc, offset


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child nobody has waited for yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    return True


@functools.cache
def _boot_id() -> str | None:
    with contextlib.suppress(OSError):
        return (PROC / "sys/kernel/random/boot_id").read_text().strip()
    return None


def process_identity(pid: int) -> dict | None:
    """What tells process ``pid`` from a later one given the same pid: ``{start_time, boot_id}`` (clock ticks
    after boot, ``/proc/PID/stat`` field 22, fixed when the process is made; the boot). None where there is no
    ``/proc`` (not Linux) or no such process."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold ")" and blanks
    return {"start_time": int(fields[19]), "boot_id": _boot_id()}


def started_identity(proc: subprocess.Popen) -> dict | None:
    """:func:`process_identity` of a process :func:`launch` just started."""
    return process_identity(proc.pid)


def _started_at(start_time: int) -> float | None:
    """Seconds since the epoch at which a process of ``start_time`` (clock ticks after boot) started."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        boot = next(line for line in (PROC / "stat").read_text().splitlines() if line.startswith("btime "))
        return int(boot.split()[1]) + start_time / os.sysconf("SC_CLK_TCK")
    return None


#: how far a process's start may lie from an earlier version's recorded ``started`` (set just after it)
STARTED_WITHIN_S = 10.0


def is_running(record: dict) -> bool:
    """The process of ``record`` (``pid``, and ``identity`` from :func:`process_identity` when it started)
    still runs: its pid is alive, started at the recorded time, in the same boot.

    A record without ``identity`` (written by an earlier version) matches a process that started within
    :data:`STARTED_WITHIN_S` of its ``started``; without ``/proc`` (not Linux) the pid alone tells.
    """
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0 or not alive(pid):
        return False
    if not PROC.is_dir():
        return True
    now = process_identity(pid)
    recorded = record.get("identity")
    if now is None:
        return False
    if not isinstance(recorded, dict):
        started, at = record.get("started"), _started_at(now["start_time"])
        return isinstance(started, int | float) and at is not None and abs(at - started) <= STARTED_WITHIN_S
    return all(recorded.get(key) == now[key] for key in ("start_time", "boot_id"))


def _returncode(code: int | None) -> str:
    if code is None:
        return "unknown"
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"


def _exit_status(pid: int) -> str:
    """How our child ``pid`` ended (collecting it); for a process ``up`` started, only that it ended."""
    unknown = "ended (its exit status went to `phasestream up`)"
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return unknown
    if not done:
        return unknown
    return _returncode(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


def request_restart(run_dir: Path, name: str) -> None:
    """Ask the supervisor of ``run_dir`` to restart ``name`` and stop the component (SIGTERM)."""
    (Path(run_dir) / f"restart-{name}").touch()
    record = read_state(run_dir)["components"][name]
    if is_running(record):  # not a process that took a stale record's pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(record["pid"], signal.SIGTERM)


class Supervisor:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.stopping = threading.Event()
        self.children: dict[str, subprocess.Popen] = {}
        self.due: dict[str, float] = {}  # component -> when to start it again
        self.delay: dict[str, float] = {}

    def step(self) -> None:
        state = read_state(self.run_dir)
        changed = False
        for name, record in state["components"].items():
            request = self.run_dir / f"restart-{name}"
            requested = request.exists()
            if is_running(record):
                # SIGTERM was sent with the request: a component that ignores it for 30 s is killed
                if requested and time.time() - request.stat().st_mtime > STOP_GRACE:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(record["pid"], signal.SIGKILL)
                continue
            now = time.monotonic()
            if name not in self.due:
                child = self.children.get(name)
                how = _returncode(child.poll()) if child is not None and child.pid == record["pid"] else \
                    _exit_status(record["pid"])
                stable = time.time() - record.get("started", 0) > STABLE_AFTER
                # at once after a first death (or a requested restart), then 1 s, 2 s, 4 s ... in a row
                delay = 0.0 if requested or stable or name not in self.delay else \
                    min(max(2 * self.delay[name], FIRST_DELAY), MAX_DELAY)
                self.delay[name] = delay
                self.due[name] = now + delay
                record["last_exit"] = "restart requested" if requested else how
                logger.warning("%s (pid %d) is gone (%s); starting it again in %.0f s", name, record["pid"],
                               record["last_exit"], delay)
                if alive(record["pid"]):  # the pid is another process's now: neither it nor its group is ours
                    logger.warning("%s: pid %d now belongs to another process; left alone", name, record["pid"])
                else:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(record["pid"], signal.SIGKILL)  # what is left of its group frees its ports
                changed = True
            if now >= self.due[name] and not self.stopping.is_set():
                proc, offset = launch(record["command"], Path(record["log"]), dict(os.environ), self.run_dir)
                self.children[name] = proc
                record.update(pid=proc.pid, identity=started_identity(proc), started=time.time(),
                              log_offset=offset, restarts=int(record.get("restarts", 0)) + 1,
                              last_restart=time.time())
                del self.due[name]
                with contextlib.suppress(FileNotFoundError):
                    (self.run_dir / f"restart-{name}").unlink()
                logger.warning("%s started again: pid %d (restart %d)", name, proc.pid, record["restarts"])
                changed = True
        if changed:
            write_state(self.run_dir, state)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        logger.warning("supervising the stack of %s (pid %d)", self.run_dir, os.getpid())
        while not self.stopping.wait(POLL):
            try:
                self.step()
            except Exception:
                logger.exception("supervision step failed; trying again")
        logger.warning("supervisor stopped")
        return 0


def supervise(run_dir: Path) -> int:
    """Supervise the stack recorded in ``run_dir`` until SIGTERM."""
    return Supervisor(run_dir).run()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    sys.exit(supervise(Path(sys.argv[1])))
