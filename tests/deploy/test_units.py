"""The systemd units of deploy/systemd load cleanly (`systemd-analyze verify`) and are sandboxed: each
unit's offline `systemd-analyze security` exposure is at most 4.0 ("OK"), with and without the GPU
drop-in. Neither needs a running systemd (PID 1): both read the unit files only."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
UNITS = sorted(path.name for path in SYSTEMD.glob("*.service"))
NOTIFY = {"phasestream-worker.service", "phasestream-proxy.service", "phasestream-models.service",
          "phasestream-view.service"}
# the units whose processes compile code at run time (numba, TensorFlow): no MemoryDenyWriteExecute
JIT = {"phasestream-worker.service", "phasestream-models.service", "phasestream-dask-worker.service"}
MAX_EXPOSURE = 4.0
PREFIX = "/opt/phasestream/.venv/bin"
ANALYZE = shutil.which("systemd-analyze")

needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (Debian: apt-get "
                                                            "install systemd); it runs without systemd as PID 1")


def _settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", ";", "[")):
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _installed(tmp_path: Path, *, gpu: bool = False) -> Path:
    """The units in ``tmp_path/units``, their programs ``/opt/phasestream/.venv/bin/*`` replaced by stub
    executables in ``tmp_path/bin`` (verify checks that every ExecStart* program exists)."""
    bin_dir, units = tmp_path / "bin", tmp_path / "units"
    bin_dir.mkdir()
    units.mkdir()
    for name in ("python", "phasestream"):
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / name).chmod(0o755)
    for path in SYSTEMD.iterdir():
        if path.suffix in (".service", ".target"):
            (units / path.name).write_text(path.read_text().replace(PREFIX, str(bin_dir)))
    if gpu:
        drop_in = units / "phasestream-models.service.d"
        drop_in.mkdir()
        shutil.copy(SYSTEMD / "gpu.conf", drop_in / "gpu.conf")
    return units


def _exposure(unit: Path) -> float:
    result = subprocess.run([ANALYZE, "security", "--offline=true", str(unit)], capture_output=True, text=True,
                            timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) ", result.stdout)
    assert match, f"no exposure level for {unit.name}: {result.stdout[-500:]} {result.stderr[-500:]}"
    return float(match.group(1))


@needs_analyze
@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu-drop-in"])
def test_units_verify_without_a_warning(tmp_path, gpu):
    units = _installed(tmp_path, gpu=gpu)
    paths = [str(units / name) for name in (*UNITS, "phasestream.target")]
    result = subprocess.run([ANALYZE, "verify", *paths], capture_output=True, text=True, timeout=120)
    # verify exits 0 on unknown keys and unparsable values too: any message is a finding
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr)


@needs_analyze
@pytest.mark.parametrize("name", UNITS)
def test_each_unit_is_sandboxed(tmp_path, name):
    units = _installed(tmp_path)
    assert _exposure(units / name) <= MAX_EXPOSURE


@needs_analyze
def test_the_gpu_drop_in_keeps_the_model_server_sandboxed(tmp_path):
    units = _installed(tmp_path, gpu=True)
    assert _exposure(units / "phasestream-models.service") <= MAX_EXPOSURE


def test_a_verify_finding_is_caught(tmp_path):
    """The verify check above would see a misspelt setting (the guard against a silent pass)."""
    if ANALYZE is None:
        pytest.skip("systemd-analyze is not installed")
    units = _installed(tmp_path)
    unit = units / "phasestream-proxy.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=strickt"))
    result = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "strickt" in result.stderr


@pytest.mark.parametrize("name", UNITS)
def test_readiness_and_sandbox_settings(name):
    unit = _settings((SYSTEMD / name).read_text())
    if name in NOTIFY:  # the process sends READY=1 itself
        assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    else:
        assert unit["Type"] == ["exec"]
    assert unit["ProtectSystem"] == ["strict"] and unit["CapabilityBoundingSet"] == [""]
    assert unit["ReadWritePaths"] == ["/var/lib/phasestream"] and unit["UMask"] == ["0077"]
    assert unit["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert unit["PrivateDevices"] == ["yes"]  # the GPU is a drop-in (gpu.conf)
    assert ("MemoryDenyWriteExecute" in unit) == (name not in JIT)
    assert unit["User"] == ["phasestream"] and unit["EnvironmentFile"] == ["/etc/phasestream/phasestream.env"]
