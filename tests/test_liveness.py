"""Whether the process a record names is gone (``phasestream.store.liveness``), against the real process table."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from phasestream.store.liveness import process_gone, process_identity


def test_a_process_that_ended_on_this_host_is_gone_and_this_one_is_not():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    me = process_identity()
    assert me["pid"] == os.getpid() and not process_gone(me)
    assert process_gone({**me, "pid": child.pid})


@pytest.mark.parametrize("change", [
    {"host": "another-host"},  # a pid means nothing on another host...
    {"pid_namespace": "pid:[1]"},  # ...or in another PID namespace (container)
    {"pid": True}, {"pid": "123"}, {"pid": 0}, {"pid": -1}, {"pid": None},  # edited by hand: cannot tell
])
def test_what_cannot_be_told_is_never_taken_as_gone(change):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not process_gone({**process_identity(), "pid": child.pid, **change})


@pytest.mark.parametrize("record", [None, "host:1", ["host", 1], {}])
def test_a_record_of_another_type_is_not_gone(record):
    assert not process_gone(record)
