"""aXis2000 / SDF stacks: .hdr headers and .xim images written here from the format's
description (MANTiS's SDF plugin, mantis_xray/file_plugins/file_sdf.py of
mlerotic/spectromicroscopy, and a MAXYMUS header in stonerlab/Stoner-PythonCode sample-data:
structures in braces, count-prefixed Points arrays, one tab-separated text row per QAxis point,
<stem>_a000.xim ... per energy), read back."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from phasestream.formats import FormatError, read_stack
from phasestream.formats.axis2000 import MAX_HEADER_BYTES, parse_hdr, read_axis2000

ENERGIES = np.array([705.0, 707.5, 708.25, 710.0])
X = -75.523 + 0.0333 * np.arange(5)  # PAxis, columns
Y = 2680.228 + 0.0333 * np.arange(3)  # QAxis, rows
REAL = Path(__file__).parents[1] / "data" / "axis2000-real"


def _points(values) -> str:
    return "(" + ", ".join([str(len(values))] + [f"{v:.3f}" for v in values]) + ")"


def _header(
    stem: str,
    energies=ENERGIES,
    x=X,
    y=Y,
    *,
    flags="Image Stack",
    scan_type="NEXAFS Image Scan",
    stack_name="Energy",
    regions=1,
    extra="",
) -> str:
    region = (
        '{\n\t\t\tPAxis = { Name = "Sample X"; Unit = "um"; Min = 0; Max = 1; Dir = 1;\n'
        f"\t\t\t\tPoints = {_points(x)};\n}};\n\n"
        '\t\t\tQAxis = { Name = "Sample Y"; Unit = "um"; Min = 0; Max = 1; Dir = 1;\n'
        f"\t\t\t\tPoints = {_points(y)};\n}};\n}}"
    )
    return (
        f'\nScanDefinition = {{ Label = "{stem}.hdr"; Type = "{scan_type}"; Flags = "{flags}"; Dwell = 1.2;\n'
        f"\tRegions = ({regions},\n" + ",\n".join([region] * regions) + ");\n\n"
        f'\tStackAxis = {{ Name = "{stack_name}"; Unit = "eV"; Min = 0; Max = 1; Dir = 1;\n'
        f"\t\tPoints = {_points(energies)};\n}};\n\n"
        '\tChannels = (2,\n{ Name = "PMT"; Unit = "counts";},\n{ Name = "Diode"; Unit = "counts";});\n};\n'
        ' Time = "2026 November 30 10:00:00"; BeamFeedback = false; ShutterAutomatic = true;\n'
        "StorageRingCurrent = 297; " + extra + "\n"
    )


def _xim(image: np.ndarray) -> str:
    return "".join("".join(f"{int(v)}\t" for v in row) + "\n" for row in image)


def _write_stack(folder: Path, stem="Sample_001", n=4, channel="a", seed=5) -> tuple[Path, np.ndarray]:
    images = np.random.default_rng(seed).integers(1000, 20000, size=(n, Y.size, X.size))
    header = folder / f"{stem}.hdr"
    header.write_text(_header(stem))
    for i, image in enumerate(images):
        (folder / f"{stem}_{channel}{i:03d}.xim").write_text(_xim(image))
    return header, images


def test_stack_reads_back(tmp_path):
    header, images = _write_stack(tmp_path)
    stack = read_stack(header)  # .hdr -> axis2000
    assert stack.format == "axis2000" and stack.mode == "stxm"
    np.testing.assert_array_equal(stack.images, images.astype(np.float64))
    np.testing.assert_allclose(stack.energies, ENERGIES)
    assert stack.files == (header, *(tmp_path / f"Sample_001_a{i:03d}.xim" for i in range(4)))
    meta = stack.metadata
    assert meta["dwell_ms"] == 1.2 and meta["channel"] == "PMT" and meta["label"] == "Sample_001.hdr"
    assert meta["pixel_size_x_um"] == pytest.approx(0.0333, abs=1e-3)
    assert meta["start_time"] == "2026 November 30 10:00:00"


@pytest.mark.parametrize("ending", ["\r\n", "\r"], ids=["CR LF", "CR"])
def test_rows_ending_in_cr_lf_or_cr_alone_read_back(tmp_path, ending):
    """Windows and classic Mac line ends: the row-by-row reader took only LF for a row's end."""
    header, images = _write_stack(tmp_path)
    for i in range(len(images)):
        xim = tmp_path / f"Sample_001_a{i:03d}.xim"
        xim.write_bytes(xim.read_bytes().replace(b"\n", ending.encode()))
    np.testing.assert_array_equal(read_stack(header).images, images.astype(np.float64))


def test_second_channel_and_energy_override(tmp_path):
    header, _ = _write_stack(tmp_path)
    _, diode = _write_stack(tmp_path, channel="b", seed=9)
    np.testing.assert_array_equal(read_axis2000(header, channel="Diode").images, diode)
    np.testing.assert_array_equal(read_axis2000(header, channel=1).images, diode)
    stack = read_axis2000(header, energies=[1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(stack.energies, [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(FormatError, match="no channel 'APD'"):
        read_axis2000(header, channel="APD")


def test_parse_hdr_structures_and_arrays(tmp_path):
    header = tmp_path / "h.hdr"
    header.write_text(_header("h", extra="ImageScan = { EnergyRegions = (1,\n{ StartEnergy = 708; Points = 1;}); };"))
    parsed = parse_hdr(header)
    scan = parsed["ScanDefinition"]
    assert scan["Dwell"] == 1.2 and scan["Flags"] == "Image Stack"
    assert scan["Regions"][0] == 1 and scan["Regions"][1]["PAxis"]["Points"][0] == 5
    assert scan["StackAxis"]["Points"][1:] == pytest.approx(list(ENERGIES))
    assert scan["Channels"][2]["Name"] == "Diode"
    assert parsed["BeamFeedback"] == "false" and parsed["StorageRingCurrent"] == 297
    assert parsed["ImageScan"]["EnergyRegions"][1]["StartEnergy"] == 708


def test_single_image(tmp_path):
    header = tmp_path / "img.hdr"
    text = _header(
        "img", flags="Image", extra="ImageScan = { EnergyRegions = (1,\n{ StartEnergy = 708.5; Points = 1;}); };"
    )
    header.write_text(text)
    image = np.arange(15).reshape(3, 5) + 100
    (tmp_path / "img_a.xim").write_text(_xim(image))
    stack = read_axis2000(header)
    np.testing.assert_array_equal(stack.images, image[np.newaxis])
    np.testing.assert_array_equal(stack.energies, [708.5])


def test_missing_xim(tmp_path):
    header, _ = _write_stack(tmp_path)
    (tmp_path / "Sample_001_a002.xim").unlink()
    with pytest.raises(FormatError, match=r"lists 4 energies but 3 .*missing: \['Sample_001_a002.xim'\]") as info:
        read_axis2000(header)
    assert info.value.path == str(header)


def test_more_xim_than_energies(tmp_path):
    header, _ = _write_stack(tmp_path)
    (tmp_path / "Sample_001_a004.xim").write_text(_xim(np.ones((3, 5))))
    with pytest.raises(FormatError, match="lists 4 energies but 5"):
        read_axis2000(header)


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        (np.ones((2, 5)), r"image is 2 rows; the header says 3 rows"),
        (np.ones((4, 5)), r"image has over 3 rows; the header says 3 rows"),
        (np.ones((3, 6)), r"row 1 holds 6 values; the header says 5"),
    ],
)
def test_wrong_image_size(tmp_path, image, problem):
    header, _ = _write_stack(tmp_path)
    bad = tmp_path / "Sample_001_a001.xim"
    bad.write_text(_xim(image))
    with pytest.raises(FormatError, match=problem) as info:
        read_axis2000(header)
    assert info.value.path == str(bad)


def test_ragged_and_non_numeric_images(tmp_path):
    header, _ = _write_stack(tmp_path)
    bad = tmp_path / "Sample_001_a003.xim"
    bad.write_text("1\t2\t3\t4\t5\n1\t2\t3\n1\t2\t3\t4\t5\n")
    with pytest.raises(FormatError, match=r"row 2 holds 3 values"):
        read_axis2000(header)
    bad.write_text("1\t2\t3\t4\t5\n1\t2\tx\t4\t5\n1\t2\t3\t4\t5\n")
    with pytest.raises(FormatError, match="row 2 holds values that are not numbers"):
        read_axis2000(header)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"flags": "Spectra", "scan_type": "NEXAFS Point Scan"}, "is not an image stack"),
        ({"regions": 2}, "2 regions: only single-region"),
        ({"stack_name": "MagnetField"}, "stack axis is 'MagnetField', not Energy"),
        ({"energies": [705.0, 705.0, 708.0, 710.0]}, "duplicate energies"),
        ({"energies": [-2.0, -1.0, 1.0, 2.0]}, "photon energies are > 0 eV"),
    ],
)
def test_bad_headers(tmp_path, kwargs, problem):
    header, _ = _write_stack(tmp_path)
    header.write_text(_header("Sample_001", **kwargs))
    with pytest.raises(FormatError, match=problem) as info:
        read_axis2000(header)
    assert info.value.path == str(header)


def test_header_energy_count_differs_from_images(tmp_path):
    header, _ = _write_stack(tmp_path)
    header.write_text(_header("Sample_001", energies=ENERGIES[:3]))
    with pytest.raises(FormatError, match="lists 3 energies but 4"):
        read_axis2000(header)


def test_truncated_and_corrupt_headers(tmp_path):
    header, _ = _write_stack(tmp_path)
    text = header.read_text()
    header.write_text(text[: len(text) // 2])
    with pytest.raises(FormatError, match="truncated"):
        read_axis2000(header)
    header.write_text(text.replace("Points = (5,", "Points = (7,"))
    with pytest.raises(FormatError, match="PAxis Points says 7 values but lists 5"):
        read_axis2000(header)
    header.write_text('ScanDefinition = { Label = "oops; };')
    with pytest.raises(FormatError, match="unterminated string"):
        read_axis2000(header)
    header.write_text("just some text\n")
    with pytest.raises(FormatError):
        read_axis2000(header)


@pytest.mark.parametrize(("text", "problem"), [
    ("ScanDefinition = " + "{ A = " * 5000 + "1", "nested over 32 deep"),  # RecursionError before
    ("ScanDefinition = " + "(" * 5000, "nested over 32 deep"),
])
def test_deeply_nested_header_is_refused(tmp_path, text, problem):
    header = tmp_path / "deep.hdr"
    header.write_text(text)
    with pytest.raises(FormatError, match=problem):
        read_axis2000(header)


@pytest.mark.parametrize("image_scan", [
    "ImageScan = (1, 2);",  # an array where a structure belongs: AttributeError before
    "ImageScan = { EnergyRegions = (0); };",  # a count of none: IndexError before
    "ImageScan = { EnergyRegions = (1, 708.5); };",  # a number where a region belongs
])
def test_single_image_header_of_the_wrong_shape_is_a_format_error(tmp_path, image_scan):
    header = tmp_path / "img.hdr"
    header.write_text(_header("img", flags="Image", extra=image_scan))
    (tmp_path / "img_a.xim").write_text(_xim(np.arange(15).reshape(3, 5) + 100))
    with pytest.raises(FormatError) as info:
        read_axis2000(header)
    assert info.value.path == str(header)


def test_an_error_no_check_foresaw_is_the_files_format_error(tmp_path, monkeypatch):
    """Whatever a reader raises on a file is a FormatError naming that file (an import of several files
    goes on with the next), never a traceback."""
    from phasestream import formats

    header, _ = _write_stack(tmp_path)

    def broken(path, energies=None):
        raise KeyError("something nobody foresaw")

    monkeypatch.setitem(formats._READERS, "axis2000", broken)
    with pytest.raises(FormatError, match="the axis2000 reader could not read this file: KeyError") as info:
        formats.read_stack(header)
    assert info.value.path == str(header)


def test_a_header_over_the_bound_is_refused_unread(tmp_path):
    """A real header is a few kB (the MAXYMUS one in tests/data/axis2000-real is 5.8 kB); one of over
    MAX_HEADER_BYTES is refused by its size, before it is read."""
    header = tmp_path / "big.hdr"
    header.write_text("A = (" + "10," * (2**21 // 3) + ");")  # 2 MiB
    with pytest.raises(FormatError, match=f"over the {MAX_HEADER_BYTES} byte bound"):
        read_axis2000(header)
    assert (REAL / "tutorial000000003.hdr").stat().st_size * 100 < MAX_HEADER_BYTES  # a generous margin


def _peak(call) -> int:
    """Peak bytes Python allocated during ``call()`` (tracemalloc), the call's FormatError swallowed."""
    tracemalloc.start()
    try:
        call()
    except FormatError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_header_tokens_are_not_all_kept_at_once(tmp_path):
    """Parsing a header takes memory of the order of what it holds, not one Python object per token (a
    header of short tokens took 60 times its size before)."""
    header = tmp_path / "tokens.hdr"
    header.write_text("B = 1; " * 5_000)
    size = header.stat().st_size
    assert parse_hdr(header)["B"] == 1
    assert _peak(lambda: parse_hdr(header)) < 4 * size


def test_an_image_of_the_wrong_width_is_refused_at_its_first_row(tmp_path):
    """An .xim is read row by row into the image: a row of the wrong width is refused when it is met, with
    the row named, and its size never turns into one Python string per value of the file (25 times the
    file's size before)."""
    header, _ = _write_stack(tmp_path)
    bad = tmp_path / "Sample_001_a001.xim"
    bad.write_text("1\t2\t3\t4\t5\n" + ("7 " * 80 + "\n") * 2)  # row 2 of 80 values: within the byte bound
    with pytest.raises(FormatError, match=r"row 2 holds 80 values; the header says 5 \(PAxis\)") as info:
        read_axis2000(header)
    assert info.value.path == str(bad)
    n = 400
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "s.hdr").write_text(_header("s", energies=[708.0], x=np.arange(n) * 0.05, y=np.arange(n) * 0.05,
                                          flags="Image", extra="ImageScan = { EnergyRegions = (1, "
                                          "{ StartEnergy = 708; }); };"))
    xim = folder / "s_a.xim"
    xim.write_text(("10 " * (10 * n) + "\n") * (3 * n // 4))  # just under 32 bytes a pixel, 10x too wide
    assert xim.stat().st_size < 32 * n * n + 4096
    assert _peak(lambda: read_axis2000(folder / "s.hdr")) < n * n * 8 + xim.stat().st_size // 4  # the image
