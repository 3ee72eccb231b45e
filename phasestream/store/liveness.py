"""Which process writes a record, and whether that process is gone (docs/contract.md#results-and-recovery).

A record a process writes while it works (a result that says ``running``, a post-scan job's ``running``
record) names the process: :func:`process_identity` gives ``{host, pid, pid_namespace, started_at}``. A pid
means the same process only on the same host and in the same PID namespace, so :func:`process_gone` says
True only there, when no process of that pid exists: then nobody will ever finish the record. Elsewhere (another
host, another container) it cannot tell, and the record's own staleness rules apply.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["process_gone", "process_identity"]


def _pid_namespace() -> str | None:
    """This process's PID namespace (``pid:[4026531836]``): a pid means the same process only within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux
        return None


def process_identity() -> dict[str, Any]:
    """This process as a record names it: ``{host, pid, pid_namespace, started_at}`` (seconds since the epoch)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": _pid_namespace(),
            "started_at": round(time.time(), 3)}


def process_gone(record: Any) -> bool:
    """The process ``record`` names (a mapping with ``host``, ``pid``, ``pid_namespace``) ran on this host, in
    this PID namespace, and no longer exists. False whenever that cannot be told: another host or namespace, a
    record without them or of another type (a field edited by hand), a process of another user."""
    if not isinstance(record, Mapping):
        return False
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or record.get("pid_namespace") != _pid_namespace():
        return False
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists (another user's process)
        return False
    return False
