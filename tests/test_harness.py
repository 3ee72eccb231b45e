"""The test harness itself: one test's imports must not break a later test's output capture."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

FIRST = """
def test_imports_absl():
    import absl.logging  # noqa: F401  (as TensorFlow does, inside a test: stderr is pytest's capture file)
"""

SECOND = """
import logging.config

def test_configures_logging_while_capturing(capsys):
    logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})  # as an embedded Tiled server does
    print("captured")
    assert capsys.readouterr().out == "captured\\n"
"""


def _run(folder: Path, *, fixed: bool) -> subprocess.CompletedProcess:
    folder.mkdir()
    (folder / "test_a_first.py").write_text(FIRST)
    (folder / "test_b_second.py").write_text(SECOND)
    conftest = (f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
                "from support import keep_absl_off_captured_streams\nkeep_absl_off_captured_streams()\n")
    (folder / "conftest.py").write_text(conftest if fixed else "")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           "--rootdir", str(folder), str(folder)], capture_output=True, text=True, timeout=300,
                          cwd=folder)


def test_absl_imported_in_one_test_does_not_close_the_capture_of_a_later_one(tmp_path):
    pytest.importorskip("absl.logging")
    broken = _run(tmp_path / "unfixed", fixed=False)
    # the mechanism, shown without the fix: pytest loses its capture file
    assert broken.returncode != 0 and "I/O operation on closed file" in broken.stdout + broken.stderr
    fixed = _run(tmp_path / "fixed", fixed=True)
    assert fixed.returncode == 0, fixed.stdout[-3000:] + fixed.stderr[-3000:]
    assert "2 passed" in fixed.stdout
