"""Zeiss .xrm / .txrm: DXchange's two public example files (tests/data/xrm, PROVENANCE.md),
checked against an independent reading of their streams with olefile and struct, and bad
variants made from them with olefile's in-place stream writer (same-size streams only)."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import olefile
import pytest

from phasestream.formats import FormatError, read_stack
from phasestream.formats.xrm import read_xrm

DATA = Path(__file__).resolve().parents[1] / "data" / "xrm"
XRM = DATA / "test_chip00.xrm"
TXRM = DATA / "txrm_test_chip_tomo.txrm"


def _stream_image(path: Path, name: str, shape: tuple[int, int]) -> np.ndarray:
    """The oracle: a stream unpacked with struct (little-endian uint16), rows first."""
    with olefile.OleFileIO(str(path)) as ole:
        data = ole.openstream(name).read()
    return np.array(struct.unpack(f"<{shape[0] * shape[1]}H", data), dtype=np.float32).reshape(shape)


def test_single_xrm_with_reference():
    stack = read_stack(XRM)
    assert stack.format == "xrm" and stack.mode == "txm"
    assert stack.images.shape == (1, 512, 512) and stack.images.dtype == np.float32
    np.testing.assert_allclose(stack.energies, [7191.0464], rtol=1e-6)
    np.testing.assert_array_equal(stack.images[0], _stream_image(XRM, "ImageData1/Image1", (512, 512)))
    np.testing.assert_array_equal(stack.flat, _stream_image(XRM, "ReferenceData/Image", (512, 512)))
    assert stack.metadata["pixel_size_um"] == pytest.approx(0.0779, abs=1e-4)
    assert stack.metadata["exposure_s"] == pytest.approx(39.88, abs=0.01)
    assert stack.metadata["reference_file"].startswith("D:\\XTM-CONTROL")
    assert stack.files == (XRM,)


def test_txrm_energy_stream_that_does_not_match_the_images():
    with pytest.raises(FormatError, match="ImageInfo/Energy holds 61 values for 7 images") as info:
        read_xrm(TXRM)
    assert info.value.path == str(TXRM)


def test_txrm_with_energies_given():
    energies = 9200.0 + np.arange(7.0)
    stack = read_xrm(TXRM, energies=energies)
    assert stack.images.shape == (7, 256, 256) and stack.flat is None
    for k in (0, 3, 6):
        np.testing.assert_array_equal(stack.images[k], _stream_image(TXRM, f"ImageData1/Image{k + 1}", (256, 256)))
    np.testing.assert_array_equal(stack.energies, energies)
    assert stack.metadata["angles_deg"][0] == pytest.approx(-45.018, abs=1e-3)
    with pytest.raises(FormatError, match="7 images for 3 energies"):
        read_xrm(TXRM, energies=[1.0, 2.0, 3.0])
    with pytest.raises(FormatError, match="duplicate energies"):
        read_xrm(TXRM, energies=[9200.0] * 7)


def _variant(tmp_path, name: str, value: bytes, source: Path = XRM) -> Path:
    path = tmp_path / source.name
    shutil.copy(source, path)
    with olefile.OleFileIO(str(path), write_mode=True) as ole:
        ole.write_stream(name, value)
    return path


@pytest.mark.parametrize(
    ("stream", "value", "problem"),
    [
        ("ImageInfo/DataType", struct.pack("<I", 7), "ImageInfo/DataType 7 is not a known pixel type"),
        ("ImageInfo/ImageWidth", struct.pack("<I", 500), "ImageData1/Image1 holds 524288 bytes"),
        ("ImageInfo/ImagesTaken", struct.pack("<I", 2), "ImageInfo/Energy holds 1 values for 2 images"),
        ("ImageInfo/Energy", struct.pack("<f", float("nan")), "must be finite"),
        ("ImageInfo/Energy", struct.pack("<f", 0.0), "ImageInfo/Energy is 0: a frame of a scan saved as one file"),
        ("ImageInfo/Energy", struct.pack("<f", -1.0), "photon energies are > 0 eV"),
        ("ImageInfo/ImagesTaken", struct.pack("<I", 2**31), "over the 16 GiB bound"),
        ("ReferenceData/DataType", struct.pack("<I", 3), "ReferenceData/DataType 3 is not a known pixel type"),
    ],
)
def test_bad_streams(tmp_path, stream, value, problem):
    path = _variant(tmp_path, stream, value)
    with pytest.raises(FormatError, match=problem) as info:
        read_xrm(path)
    assert info.value.path == str(path)


def test_missing_image_stream(tmp_path):
    path = _variant(tmp_path, "ImageInfo/ImagesTaken", struct.pack("<I", 2))
    with pytest.raises(FormatError, match="image stream ImageData1/Image2 is missing"):
        read_xrm(path, energies=[7191.0, 7192.0])


@pytest.mark.parametrize("keep", [0.0, 0.0001, 0.004, 0.5, 0.999])
def test_truncated(tmp_path, keep):
    path = tmp_path / "cut.xrm"
    data = XRM.read_bytes()
    path.write_bytes(data[: int(keep * len(data))])
    with pytest.raises(FormatError) as info:
        read_stack(path)
    assert info.value.path == str(path)


def test_not_ole(tmp_path):
    path = tmp_path / "fake.txrm"
    path.write_bytes(b"not an OLE file" * 100)
    with pytest.raises(FormatError, match="not an OLE2 compound file"):
        read_stack(path)
