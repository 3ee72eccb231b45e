"""Real facility files (not written here), read by the format readers and checked against an
independent reading of the same files.

- ``tests/data/axis2000-real``: one MAXYMUS (BESSY II) aXis2000 / SDF image, ``.hdr`` + ``_a.xim``,
  from MIEP's tutorial (ElsevierSoftwareX/SOFTX-D-20-00029, MIT licence; PROVENANCE.md there).

The oracle for each fact is the file itself: the ``.hdr`` fields are taken from its text with
regular expressions in this module (not with :func:`phasestream.formats.axis2000.parse_hdr`), the
image with :func:`numpy.loadtxt`, the file contents with :mod:`hashlib`. The expected constants
(the hashes, 100 x 100 pixels, 707.8 eV, 35 ms, the time stamp, 0.02 um steps) were read by eye
from the header text and ``sha256sum`` before the reader was run, and are written down in
PROVENANCE.md; each test compares the reader with the regex / loadtxt reading as well.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from phasestream.formats import FormatError, detect_format, read_stack
from phasestream.formats.axis2000 import read_axis2000

AXIS_DIR = Path(__file__).resolve().parents[1] / "data" / "axis2000-real"
HDR = AXIS_DIR / "tutorial000000003.hdr"
XIM = AXIS_DIR / "tutorial000000003_a.xim"

# sha256sum of the files as copied from commit 4ed88831e57a (PROVENANCE.md); if these fail the
# vendored copies were changed and the other expectations no longer describe a real file.
SHA256 = {
    HDR: "af5387a46b948710f8c4de1443767fb8e053098f05b3d5180ecdf7cc5e11e2f4",
    XIM: "2c05b25b7547cdd612449e9d29f362d5fff8456075e134ac4987f425e367918b",
}


def _header_text() -> str:
    return HDR.read_text(encoding="latin-1")


def _axis_points(name: str) -> np.ndarray:
    """``<name> = { ... Points = (n, v1, ..., vn); }`` from the header text; the count checked."""
    match = re.search(name + r"\s*=\s*\{[^}]*?Points\s*=\s*\(([^)]*)\)", _header_text())
    assert match is not None, f"no {name} Points in {HDR.name}"
    values = [float(v) for v in match.group(1).split(",")]
    count, points = int(values[0]), np.array(values[1:])
    assert count == points.size
    return points


def _field(pattern: str) -> str:
    match = re.search(pattern, _header_text())
    assert match is not None, f"{pattern!r} not in {HDR.name}"
    return match.group(1)


@pytest.mark.parametrize("path", [HDR, XIM], ids=lambda p: p.name)
def test_vendored_files_are_unchanged(path):
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA256[path]


def test_header_facts_the_other_tests_rely_on():
    # Read by eye from tutorial000000003.hdr: one image ("Image Scan" / "Image"), 100 x 100 points,
    # one energy 707.800 eV in StackAxis and StartEnergy = 707.8 in ImageScan/EnergyRegions.
    assert _field(r'ScanDefinition\s*=\s*\{[^{]*?Type\s*=\s*"([^"]*)"') == "Image Scan"
    assert _field(r'ScanDefinition\s*=\s*\{[^{]*?Flags\s*=\s*"([^"]*)"') == "Image"
    assert _axis_points("PAxis").size == 100
    assert _axis_points("QAxis").size == 100
    assert _axis_points("StackAxis").tolist() == [707.8]
    assert float(_field(r"StartEnergy\s*=\s*([-\d.]+)")) == 707.8
    # the image's own record: Image0 = {... Energy = 707.80; ...}
    assert float(_field(r"Image0\s*=\s*\{[^}]*?Energy\s*=\s*([-\d.]+)")) == pytest.approx(707.8, abs=0.005)


def test_maxymus_image_reads_as_the_file_says():
    stack = read_stack(HDR)
    assert detect_format(HDR) == "axis2000"
    assert stack.format == "axis2000" and stack.mode == "stxm"

    x = _axis_points("PAxis")  # columns (Sample X)
    y = _axis_points("QAxis")  # rows (Sample Y)
    image = np.loadtxt(XIM, dtype=np.float64)  # one text row per QAxis point, tab-separated
    assert image.shape == (y.size, x.size) == (100, 100)

    assert stack.images.shape == (1, y.size, x.size)
    np.testing.assert_array_equal(stack.images[0], image)
    # energy: StackAxis Points (1, 707.800) and ImageScan StartEnergy = 707.8, both from the text
    np.testing.assert_array_equal(stack.energies, _axis_points("StackAxis"))
    assert stack.energies.tolist() == [float(_field(r"StartEnergy\s*=\s*([-\d.]+)"))]

    assert stack.metadata["channel"] == _field(r'Channels\s*=\s*\(\s*1\s*,\s*\{\s*Name\s*=\s*"([^"]*)"') == "APD"
    assert stack.metadata["scan_type"] == "Image Scan" and stack.metadata["flags"] == "Image"
    assert stack.metadata["dwell_ms"] == float(_field(r"Dwell\s*=\s*([\d.]+);")) == 35.0
    assert stack.metadata["start_time"] == _field(r'\bTime\s*=\s*"([^"]*)"') == "2019 March 22 10:37:42"
    assert stack.metadata["label"] == HDR.name
    # pixel size: the median step of the listed positions, and the header's own XStep / YStep (0.02 um)
    assert stack.metadata["pixel_size_x_um"] == pytest.approx(float(np.median(np.abs(np.diff(x)))))
    assert stack.metadata["pixel_size_y_um"] == pytest.approx(float(np.median(np.abs(np.diff(y)))))
    assert stack.metadata["pixel_size_x_um"] == pytest.approx(float(_field(r"XStep\s*=\s*([\d.]+)")), abs=1e-3)
    assert stack.metadata["pixel_size_y_um"] == pytest.approx(float(_field(r"YStep\s*=\s*([\d.]+)")), abs=1e-3)
    assert list(stack.files) == [HDR, XIM]


def test_maxymus_image_refuses_a_channel_it_does_not_have():
    # the header lists one channel (Channels = (1, { Name = "APD"; ... })), so there is no "b" image
    with pytest.raises(FormatError, match="no channel"):
        read_axis2000(HDR, channel=1)


def test_maxymus_image_without_its_xim_is_refused(tmp_path):
    shutil.copy(HDR, tmp_path / HDR.name)
    with pytest.raises(FormatError, match=r"missing \.xim"):
        read_axis2000(tmp_path / HDR.name)
