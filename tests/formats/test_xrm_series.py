"""A folder of single-frame Zeiss .xrm files as one TXM stack (phasestream/formats/xrm_series.py).

Real frames: ``tests/data/xrm-series-ssrl`` (PROVENANCE.md there) holds one sample frame of the SSRL 6-2c NCA
XANES scan of xanespy's test data (8324.0 eV, below the Ni K-edge) and two of its broken reference frames (the
whole scan, 26 frames at two energies, is 57 MB: read once, docs/formats.md, not vendored). Synthetic series
are copies of DXchange's ``tests/data/xrm/test_chip00.xrm`` whose energy and pixel streams are rewritten in
place with olefile (same-size streams only). The oracle for pixels is each file read here with olefile and
NumPy, for energies the names and the values written, for the counts the files made.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
from pathlib import Path

import numpy as np
import olefile
import pytest

from phasestream.formats import FORMATS, FormatError, detect_format, read_stack
from phasestream.formats import xrm_series as series_module
from phasestream.formats.stack import check_stack_size
from phasestream.formats.xrm import read_xrm
from phasestream.formats.xrm_names import parse_xrm_name
from phasestream.formats.xrm_series import read_xrm_series

DATA = Path(__file__).resolve().parents[1] / "data"
SSRL = DATA / "xrm-series-ssrl"
SAMPLE = SSRL / "rep01_20161456_ssrl-test-data_08324.0_eV_001of003.xrm"
NO_IMAGE = SSRL / "rep02_000072_ref_20161456_ssrl-test-data_08348.0_eV_002of010.xrm"
CUT = SSRL / "rep02_000182_ref_20161456_ssrl-test-data_08400.0_eV_002of010.xrm"
CHIP = DATA / "xrm" / "test_chip00.xrm"  # 512 x 512 uint16, ImageInfo/Energy 7191.0464 eV
TXRM = DATA / "xrm" / "txrm_test_chip_tomo.txrm"

# sha256sum of the files as copied from xanespy commit 2b9cc4cecf48 (PROVENANCE.md)
SHA256 = {
    SAMPLE: "6dc8109a25b4c74c59be6473bf82b0a6efc9534f894163bf4a0836b3c2f3b1fa",
    NO_IMAGE: "72750ce1a3060df0f9b4213f4d8d49302e152438f1ee9094cc01c24a00ae08d2",
    CUT: "83c715a8beea73a92903b38f9e569a5b378bdd0b44f5c64d81d497c596ed70e0",
}


def _pixels(path: Path) -> np.ndarray:
    """The oracle: a frame's ImageData1/Image1 read with olefile, shaped from its own header."""
    with olefile.OleFileIO(str(path)) as ole:
        width, height = (struct.unpack("<I", ole.openstream(f"ImageInfo/Image{s}").read()[:4])[0]
                         for s in ("Width", "Height"))
        data = ole.openstream("ImageData1/Image1").read()
    return np.frombuffer(data, dtype="<u2").reshape(height, width).astype(np.float64)


def _frame(folder: Path, name: str, energy: float | None = None, pixels=None, source: Path = CHIP,
           **streams: bytes) -> Path:
    """A copy of ``source`` named ``name`` in ``folder``, its energy, pixels and other streams rewritten."""
    path = folder / name
    shutil.copy(source, path)
    with olefile.OleFileIO(str(path), write_mode=True) as ole:
        if energy is not None:
            ole.write_stream("ImageInfo/Energy", struct.pack("<f", energy))
        if pixels is not None:
            ole.write_stream("ImageData1/Image1", np.asarray(pixels, dtype="<u2").tobytes())
        for stream, value in streams.items():
            ole.write_stream(stream.replace("__", "/"), value)
    return path


def _flat_image(value: int) -> np.ndarray:
    return np.full((512, 512), value, dtype=np.uint16)


def _ssrl(rep: str, energy: float, k: int, n: int, ref: bool = False, seq: int = 1) -> str:
    middle = f"{seq:06d}_ref_" if ref else ""
    return f"{rep}_{middle}chip_{energy:07.1f}_eV_{k:03d}of{n:03d}.xrm"


def _series(folder: Path, energies=(7100.0, 7200.0), samples: int = 1, references: int = 1, rep="rep01") -> dict:
    """An SSRL-named series: ``samples`` and ``references`` frames per energy, pixel values that differ."""
    made: dict = {}
    for e in energies:
        made[e] = ([_frame(folder, _ssrl(rep, e, k + 1, samples), e, _flat_image(100 + 10 * k + int(e) % 50))
                    for k in range(samples)],
                   [_frame(folder, _ssrl(rep, e, k + 1, references, ref=True, seq=k + 1), e,
                           _flat_image(1000 + 7 * k)) for k in range(references)])
    return made


# ---- the vendored real frames -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(SHA256), ids=lambda p: p.name[:24])
def test_vendored_files_are_unchanged(path):
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA256[path]


def test_real_ssrl_frames_take_their_energy_from_the_name(tmp_path):
    """SSRL 6-2c writes 0 in ImageInfo/Energy: the single-file reader refuses that, the series takes the
    8324.0 eV of the name. A second sample frame and a reference are the real frame with other pixels."""
    with pytest.raises(FormatError, match=r"ImageInfo/Energy is 0: .* import its folder \(format 'xrm-series'\)"):
        read_xrm(SAMPLE)
    real = _pixels(SAMPLE)
    shutil.copy(SAMPLE, tmp_path / SAMPLE.name)
    second = _frame(tmp_path, SAMPLE.name.replace("001of003", "002of003"), None, real[::-1] + 3, source=SAMPLE)
    reference = _frame(tmp_path, "rep01_000051_ref_20161456_ssrl-test-data_08324.0_eV_001of010.xrm", None,
                       real + 1000, source=SAMPLE)
    stack = read_stack(tmp_path)
    assert stack.format == "xrm-series" and stack.mode == "txm"
    np.testing.assert_array_equal(stack.energies, [8324.0])
    assert stack.images.shape == stack.flat.shape == (1, 1024, 1024)
    oracle = (_pixels(tmp_path / SAMPLE.name) + _pixels(second)) / 2
    np.testing.assert_allclose(stack.images[0], oracle.astype(np.float32), rtol=0, atol=0)
    np.testing.assert_array_equal(stack.flat[0], _pixels(reference))
    assert stack.files == (tmp_path / SAMPLE.name, second, reference)
    md = stack.metadata
    assert md["naming"] == "ssrl" and md["field"] == "rep01_20161456_ssrl-test-data"
    assert md["sample_frames"] == [2] and md["reference_frames"] == [1]
    assert md["energy_source"] == "file name"
    assert md["exposure_s"] == [0.5] and md["reference_exposure_s"] == [0.5]
    assert md["pixel_size_um"] == pytest.approx(0.0312)


def test_the_vendored_folder_has_no_reference_for_its_sample_frame():
    """The rep02 references belong to another scan repetition: they are neither used nor opened."""
    assert detect_format(SSRL) == "xrm-series"
    with pytest.raises(FormatError, match=r"no reference \(sample-out\) frame at 8324.00 eV") as info:
        read_stack(SSRL)
    assert info.value.path == str(SAMPLE)


@pytest.mark.parametrize(("broken", "energy", "problem"), [
    (NO_IMAGE, 8348.0, "ImageInfo/ImagesTaken is 0: the file holds no image"),
    (CUT, 8400.0, "ImageData1/Image1 declares 2097152 bytes in a file of 196608: truncated file"),
])
def test_real_broken_reference_frames_are_refused_naming_them(tmp_path, broken, energy, problem):
    shutil.copy(SAMPLE, tmp_path / f"rep02_20161456_ssrl-test-data_{energy:07.1f}_eV_001of003.xrm")
    shutil.copy(broken, tmp_path / broken.name)
    with pytest.raises(FormatError, match=problem) as info:
        read_stack(tmp_path)
    assert info.value.path == str(tmp_path / broken.name)


# ---- names ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "naming", "reference", "series", "key", "energy"), [
    ("rep01_20161456_ssrl-test-data_08324.0_eV_001of003.xrm", "ssrl", False, "rep01_20161456_ssrl-test-data",
     "rep01_20161456_ssrl-test-data", 8324.0),
    ("rep01_000051_ref_20161456_ssrl-test-data_08324.0_eV_001of010.xrm", "ssrl", True, None,
     "rep01_20161456_ssrl-test-data", 8324.0),
    ("rep01_Pg71-5_NCA_charge2_08250.0_eV_001of005.xrm", "ssrl", False, "rep01_Pg71-5_NCA_charge2",
     "rep01_Pg71-5_NCA_charge2", 8250.0),
    ("fov03_xanessoc01_8353_0eV.xrm", "aps", False, "fov03_xanessoc01", "xanessoc01", 8353.0),
    ("ref_xanessoc01_8353_5eV.xrm", "aps", True, None, "xanessoc01", 8353.5),
    ("sample_a.xrm", "other", False, "", "", None),
    ("a_REF_7.xrm", "other", True, None, "", None),
])
def test_names(name, naming, reference, series, key, energy):
    read = parse_xrm_name(name)
    assert (read.naming, read.reference, read.series, read.key, read.energy) == (naming, reference, series, key,
                                                                                 energy)


# ---- synthetic series ----------------------------------------------------------------------------------------


def test_frames_grouped_by_energy_averaged_and_sorted(tmp_path):
    made = _series(tmp_path, energies=(7300.0, 7100.0, 7200.0), samples=2, references=3)
    stack = read_xrm_series(tmp_path)
    np.testing.assert_allclose(stack.energies, [7100.0, 7200.0, 7300.0])
    assert stack.metadata["sample_frames"] == [2, 2, 2] and stack.metadata["reference_frames"] == [3, 3, 3]
    assert stack.metadata["energy_source"] == "ImageInfo/Energy"
    for index, energy in enumerate((7100.0, 7200.0, 7300.0)):
        samples, references = made[energy]
        np.testing.assert_array_equal(stack.images[index], np.mean([_pixels(p) for p in samples], axis=0))
        np.testing.assert_array_equal(stack.flat[index], np.mean([_pixels(p) for p in references], axis=0))
        assert stack.images[index, 0, 0] == 100 + 5 + int(energy) % 50  # values 100 + x and 110 + x written
    assert stack.files == tuple(p for e in (7100.0, 7200.0, 7300.0) for p in (*made[e][0], *made[e][1]))
    assert stack.metadata["exposure_s"] == [pytest.approx(39.8847)] * 3


def test_energies_given_replace_the_files(tmp_path):
    _series(tmp_path)
    stack = read_stack(tmp_path, energies=[8330.0, 8340.0])
    np.testing.assert_array_equal(stack.energies, [8330.0, 8340.0])
    with pytest.raises(FormatError, match="2 energies in the files for 3 energies given"):
        read_stack(tmp_path, energies=[1.0, 2.0, 3.0])


def test_aps_fields_of_view_share_their_references(tmp_path):
    for energy, name in ((7100.0, "7100_0eV"), (7200.0, "7200_0eV")):
        _frame(tmp_path, f"fov03_xanessoc01_{name}.xrm", energy, _flat_image(300))
        _frame(tmp_path, f"fov07_xanessoc01_{name}.xrm", energy, _flat_image(700))
        _frame(tmp_path, f"ref_xanessoc01_{name}.xrm", energy, _flat_image(1000))
    with pytest.raises(FormatError, match=r"2 fields of view .*: fov03_xanessoc01, fov07_xanessoc01; pass field="):
        read_stack(tmp_path)
    for field, value in (("fov07", 700), ("fov03_xanessoc01", 300)):
        stack = read_stack(tmp_path, select={"field": field})  # phasestream import --select field=...
        assert stack.metadata["field"] == f"fov{value // 100:02d}_xanessoc01"
        assert stack.metadata["naming"] == "aps"
        assert np.all(stack.images == value) and np.all(stack.flat == 1000)
        assert [p.name for p in stack.files[:2]] == [f"fov{value // 100:02d}_xanessoc01_7100_0eV.xrm",
                                                     "ref_xanessoc01_7100_0eV.xrm"]
    with pytest.raises(FormatError, match="field='xanessoc01' names 2 fields of view among"):
        read_xrm_series(tmp_path, field="xanessoc01")
    with pytest.raises(FormatError, match="field='fov09' names no field of view among: fov03_xanessoc01"):
        read_xrm_series(tmp_path, field="fov09")


def test_a_missing_reference_names_the_energy(tmp_path):
    made = _series(tmp_path, energies=(7100.0, 7200.0))
    made[7200.0][1][0].unlink()
    with pytest.raises(FormatError, match=r"no reference \(sample-out\) frame at 7200.00 eV") as info:
        read_stack(tmp_path)
    assert info.value.path == str(made[7200.0][0][0])


def test_a_reference_without_sample_frames(tmp_path):
    made = _series(tmp_path, energies=(7100.0, 7200.0))
    made[7200.0][0][0].unlink()
    with pytest.raises(FormatError, match=r"reference frames at 7200.00 eV, where no sample frame was recorded"):
        read_stack(tmp_path)


def test_frames_of_another_size(tmp_path):
    """1024 x 256 pixels hold as many bytes as 512 x 512: the header's size differs, the stream fits it."""
    made = _series(tmp_path, energies=(7100.0, 7200.0))
    reference = made[7200.0][1][0]
    with olefile.OleFileIO(str(reference), write_mode=True) as ole:
        ole.write_stream("ImageInfo/ImageWidth", struct.pack("<I", 256))
        ole.write_stream("ImageInfo/ImageHeight", struct.pack("<I", 1024))
    with pytest.raises(FormatError, match=r"a reference frame of 1024 x 256 pixels at 7200.00 eV; .* has 512 x 512"
                       ) as info:
        read_stack(tmp_path)
    assert info.value.path == str(reference)


def test_an_energy_that_disagrees_with_the_name(tmp_path):
    _series(tmp_path, energies=(7100.0, 7200.0))
    wrong = _frame(tmp_path, _ssrl("rep01", 7200.0, 2, 2), 7201.0, _flat_image(5))
    with pytest.raises(FormatError, match=r"ImageInfo/Energy 7201.000 eV disagrees with the 7200 eV in the file "
                       "name") as info:
        read_stack(tmp_path)
    assert info.value.path == str(wrong)


def test_the_files_energy_within_the_tolerance_of_the_name(tmp_path):
    """The stream's energy is the frame's; frames 0.2 eV apart are two energies, whatever their names say."""
    made = _series(tmp_path, energies=(7100.0,))
    for path in made[7100.0][0] + made[7100.0][1]:
        with olefile.OleFileIO(str(path), write_mode=True) as ole:
            ole.write_stream("ImageInfo/Energy", struct.pack("<f", 7100.2))
    stack = read_stack(tmp_path)
    np.testing.assert_allclose(stack.energies, [np.float32(7100.2)])
    with olefile.OleFileIO(str(made[7100.0][1][0]), write_mode=True) as ole:
        ole.write_stream("ImageInfo/Energy", struct.pack("<f", 7100.0))
    with pytest.raises(FormatError, match=r"reference frames at 7100.00 eV, where no sample frame was recorded"):
        read_stack(tmp_path)


def test_a_link_out_of_the_folder_is_not_followed(tmp_path):
    folder, elsewhere = tmp_path / "series", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    _series(folder, energies=(7100.0, 7200.0))
    outside = _frame(elsewhere, "x.xrm", 7300.0, _flat_image(9))
    (folder / _ssrl("rep01", 7300.0, 1, 1)).symlink_to(outside)
    (folder / _ssrl("rep01", 7300.0, 1, 1, ref=True)).symlink_to(outside)
    with pytest.raises(FormatError, match=r"is a link to .*, outside the folder .*: not followed") as info:
        read_stack(folder)
    assert info.value.path == str(folder / _ssrl("rep01", 7300.0, 1, 1))
    (folder / _ssrl("rep01", 7300.0, 1, 1)).unlink()
    (folder / _ssrl("rep01", 7300.0, 1, 1, ref=True)).unlink()
    inside = folder / _ssrl("rep01", 7200.0, 2, 2)
    inside.symlink_to(folder / _ssrl("rep01", 7200.0, 1, 1))  # a link inside the folder is read
    assert read_stack(folder).metadata["sample_frames"] == [1, 2]


def test_a_file_that_is_not_a_regular_file(tmp_path):
    _series(tmp_path)
    (tmp_path / _ssrl("rep01", 7300.0, 1, 1)).mkdir()
    with pytest.raises(FormatError, match="is not a regular file"):
        read_stack(tmp_path)


def test_a_file_of_several_images(tmp_path):
    shutil.copy(TXRM, tmp_path / _ssrl("rep01", 9200.0, 1, 1))
    with pytest.raises(FormatError, match="holds 7 images; a frame of a series holds one"):
        read_stack(tmp_path)


def test_a_frame_already_divided_by_a_reference(tmp_path):
    made = _series(tmp_path)
    with olefile.OleFileIO(str(made[7100.0][0][0]), write_mode=True) as ole:
        ole.write_stream("ImageInfo/OriginalDataRefCorrected", struct.pack("<I", 1))
    with pytest.raises(FormatError, match="OriginalDataRefCorrected is set"):
        read_stack(tmp_path)


def test_names_of_no_facility(tmp_path):
    """Energies come from the files alone; the ref token still tells the references; field= cannot pick."""
    _frame(tmp_path, "particle_a.xrm", 7100.0, _flat_image(10))
    _frame(tmp_path, "particle_b.xrm", 7200.0, _flat_image(20))
    _frame(tmp_path, "ref_a.xrm", 7100.0, _flat_image(30))
    _frame(tmp_path, "ref_b.xrm", 7200.0, _flat_image(40))
    stack = read_stack(tmp_path)
    np.testing.assert_allclose(stack.energies, [7100.0, 7200.0])
    assert stack.images[:, 0, 0].tolist() == [10, 20] and stack.flat[:, 0, 0].tolist() == [30, 40]
    assert stack.metadata["naming"] == "other" and stack.metadata["field"] is None
    with pytest.raises(FormatError, match="name no field of view; pass a file-name glob"):
        read_xrm_series(tmp_path, field="a")
    _frame(tmp_path, "particle_c.xrm", 0.0, _flat_image(10))
    with pytest.raises(FormatError, match="ImageInfo/Energy is 0 and the file name carries no energy"):
        read_stack(tmp_path)
    assert read_xrm_series(tmp_path, pattern="*_[ab].xrm").images.shape == (2, 512, 512)


def test_several_namings_need_a_pattern(tmp_path):
    _series(tmp_path)
    _frame(tmp_path, "particle_a.xrm", 7300.0)
    with pytest.raises(FormatError, match="follow several namings"):
        read_stack(tmp_path)
    assert read_xrm_series(tmp_path, pattern="rep01_*").energies.size == 2


def test_empty_and_reference_only_folders(tmp_path):
    with pytest.raises(FormatError, match=r"no .xrm files in this folder"):
        read_xrm_series(tmp_path)
    _frame(tmp_path, _ssrl("rep01", 7100.0, 1, 1, ref=True), 7100.0)
    with pytest.raises(FormatError, match=r"no sample frames: all 1 .xrm files are reference frames"):
        read_xrm_series(tmp_path)
    with pytest.raises(FormatError, match="not a folder"):
        read_stack(CHIP, format="xrm-series")


def test_the_stack_size_bound(tmp_path, monkeypatch):
    _series(tmp_path, energies=(7100.0, 7200.0))
    small = 2 * 2 * 512 * 512 * 4 - 1  # images and flat of 2 energies, one byte short
    monkeypatch.setattr(series_module, "check_stack_size", lambda p, s, d: check_stack_size(p, s, d, limit=small))
    with pytest.raises(FormatError, match=r"a stack of shape \(2, 2, 512, 512\)"):
        read_stack(tmp_path)


# ---- detection ---------------------------------------------------------------------------------------------


def test_folder_detection(tmp_path):
    assert "xrm-series" in FORMATS
    assert detect_format(tmp_path) == "tiff"  # neither: the TIFF reader says the folder holds no TIFF
    (tmp_path / "a.tif").write_bytes(b"")
    assert detect_format(tmp_path) == "tiff"
    shutil.copy(CHIP, tmp_path / "b.XRM")
    with pytest.raises(FormatError, match=r"holds both .xrm and TIFF files"):
        read_stack(tmp_path)
    (tmp_path / "a.tif").unlink()
    assert detect_format(tmp_path) == "xrm-series"


def test_reference_frames_exposed_for_another_time_are_scaled_to_the_sample_exposure(tmp_path):
    """SSRL 6-2c exposes its references 0.3 s and its sample frames 0.5 s: the flat holds what the open beam
    gives in 0.5 s, so that the OD is not ln(0.5 / 0.3) too low at every energy."""
    sample = _frame(tmp_path, _ssrl("rep01", 7100.0, 1, 1), 7100.0, _flat_image(600),
                    ImageInfo__ExpTimes=struct.pack("<f", 0.5))
    references = [_frame(tmp_path, _ssrl("rep01", 7100.0, k + 1, 2, ref=True, seq=k + 1), 7100.0,
                         _flat_image(1200 + 30 * k), ImageInfo__ExpTimes=struct.pack("<f", exposure))
                  for k, exposure in enumerate((0.3, 0.25))]
    stack = read_xrm_series(tmp_path)
    # the oracle: counts per second of each reference frame, times the sample's exposure, averaged
    expected = np.mean([_pixels(p) / t * 0.5 for p, t in zip(references, (0.3, 0.25), strict=True)], axis=0)
    np.testing.assert_allclose(stack.flat[0], expected, rtol=1e-6)
    np.testing.assert_array_equal(stack.images[0], _pixels(sample))
    assert stack.metadata["exposure_s"] == [0.5] and stack.metadata["reference_exposure_s"] == [0.275]
    assert stack.metadata["flat_scaled_to_sample_exposure"] == [pytest.approx((0.5 / 0.3 + 0.5 / 0.25) / 2, rel=1e-5)]
    od = -np.log(stack.images[0] / stack.flat[0])
    np.testing.assert_allclose(od, -np.log(600 / ((1200 / 0.3 + 1230 / 0.25) / 2 * 0.5)), rtol=1e-6)


def test_equal_exposures_leave_the_flat_as_counted(tmp_path):
    made = _series(tmp_path, samples=1, references=2)
    stack = read_xrm_series(tmp_path)
    np.testing.assert_array_equal(stack.flat[0], np.mean([_pixels(p) for p in made[7100.0][1]], axis=0))
    assert "flat_scaled_to_sample_exposure" not in stack.metadata

