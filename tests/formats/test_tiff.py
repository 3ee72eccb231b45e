"""TIFF stacks written by tifffile (multi-page and a folder), read back with read_tiff / read_stack."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import tifffile

from phasestream.formats import FORMATS, FormatError, LazyImages, TiffSource, read_stack
from phasestream.formats.energies import parse_energy_text
from phasestream.formats.stack import EXPANSION_ALLOWANCE, MAX_EXPANSION
from phasestream.formats.tiff import natural_key, read_tiff

ENERGIES = np.array([705.0, 708.5, 710.25, 712.0, 720.0])


def _stack(dtype=np.uint16, shape=(5, 6, 7)) -> np.ndarray:
    rng = np.random.default_rng(20)
    return rng.integers(100, 60000, size=shape).astype(dtype)


def test_multipage_with_energy_list(tmp_path):
    images = _stack()
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, images, photometric="minisblack")
    stack = read_tiff(path, energies=ENERGIES.tolist())
    assert stack.format == "tiff" and stack.mode == "stxm"
    assert stack.images.dtype == np.float32
    np.testing.assert_array_equal(stack.images, images.astype(np.float32))
    np.testing.assert_array_equal(stack.energies, ENERGIES)
    assert stack.files == (path,)
    # uncompressed pages one after the other: mapped, not read (an import that leaves them reads only a sample)
    assert isinstance(stack.images, LazyImages) and stack.images.stored_dtype == images.dtype
    np.testing.assert_array_equal(stack.images[-1], images[-1])
    compressed = tmp_path / "zlib.tif"
    tifffile.imwrite(compressed, images, photometric="minisblack", compression="zlib")
    again = read_tiff(compressed, energies=ENERGIES.tolist())
    assert isinstance(again.images, np.ndarray) and again.images.dtype == np.float32  # compressed pages are read
    np.testing.assert_array_equal(again.images, images.astype(np.float32))
    assert stack.shape == (6, 7)


def test_pages_appended_one_by_one_and_float64(tmp_path):
    images = np.random.default_rng(1).random((3, 4, 5))
    path = tmp_path / "appended.tiff"
    for image in images:
        tifffile.imwrite(path, image, append=True)
    stack = read_tiff(path, energies=[1.0, 2.0, 3.0], mode="txm")
    assert stack.images.dtype == np.float64 and stack.mode == "txm"
    np.testing.assert_array_equal(stack.images, images)


def test_single_page_is_one_energy(tmp_path):
    image = _stack(shape=(4, 5))
    path = tmp_path / "one.tif"
    tifffile.imwrite(path, image)
    stack = read_tiff(path, energies=[850.0])
    assert stack.images.shape == (1, 4, 5)
    np.testing.assert_array_equal(stack.images[0], image)


def test_energy_file_beside_the_stack_and_its_syntax(tmp_path):
    images = _stack()
    path = tmp_path / "scan.tif"
    tifffile.imwrite(path, images, photometric="minisblack")
    (tmp_path / "scan.txt").write_text("# Fe L3\n705, 708.5\n710.25   712.0 # edge\n\n720.0\n")
    stack = read_tiff(path)
    np.testing.assert_array_equal(stack.energies, ENERGIES)
    assert stack.files == (path, tmp_path / "scan.txt")
    # read_stack detects TIFF from the suffix and finds the same file
    again = read_stack(path)
    np.testing.assert_array_equal(again.images, stack.images)
    assert again.sha256() == stack.sha256()


def test_folder_in_natural_order(tmp_path):
    images = _stack(dtype=np.uint8, shape=(11, 3, 4))
    energies = np.linspace(280.0, 300.0, 11)
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, image in enumerate(images):
        tifffile.imwrite(folder / f"img_{index}.tif", image)  # img_10 sorts after img_9
    (folder / ".hidden.tif").write_bytes(b"not a tiff")
    (folder / "energies.txt").write_text("\n".join(str(e) for e in energies))
    stack = read_stack(folder)
    assert stack.format == "tiff"
    np.testing.assert_array_equal(stack.images, images.astype(np.float32))
    np.testing.assert_array_equal(stack.energies, energies)
    assert [p.name for p in stack.files[:-1]] == [f"img_{i}.tif" for i in range(11)]
    assert stack.metadata["image_files"][-1] == "img_10.tif"
    # uncompressed single pages of one type: mapped from the files, read when indexed, as the files hold them
    assert isinstance(stack.images, LazyImages) and stack.images.stored_dtype == np.uint8
    np.testing.assert_array_equal(stack.images[10], images[10])
    np.testing.assert_array_equal(stack.images[2:5, 1], images[2:5, 1])
    assert stack.images[5:5].shape == (0, 3, 4)


def test_natural_key():
    names = ["a10.tif", "a2.tif", "A1.tif", "b.tif"]
    assert sorted(names, key=natural_key) == ["A1.tif", "a2.tif", "a10.tif", "b.tif"]


def test_read_stack_energy_file_and_mode(tmp_path):
    images = _stack()
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, images, photometric="minisblack")
    efile = tmp_path / "e.dat"
    efile.write_text(" ".join(map(str, ENERGIES)))
    stack = read_stack(path, format="TIFF", energies=efile, mode="txm")
    assert stack.mode == "txm" and stack.files == (path, efile)
    assert "tiff" in FORMATS


@pytest.mark.parametrize(
    ("energies", "problem"),
    [
        ([1.0, 2.0, 3.0], r"5 images \(pages\) for 3 energies"),
        ([1.0, 2.0, 2.0, 3.0, 4.0], "duplicate energies"),
        ([1.0, 2.0, float("nan"), 3.0, 4.0], "must be finite"),
        ([], "no energies"),
    ],
)
def test_bad_energies(tmp_path, energies, problem):
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, _stack(), photometric="minisblack")
    with pytest.raises(FormatError, match=problem) as info:
        read_tiff(path, energies=energies)
    assert info.value.path == str(path)


def test_missing_energies_and_bad_energy_file(tmp_path):
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, _stack(), photometric="minisblack")
    with pytest.raises(FormatError, match="TIFF has no energies"):
        read_tiff(path)
    (tmp_path / "s.txt").write_text("705\n7o8\n")
    with pytest.raises(FormatError, match=r"line 2: '7o8' is not an energy") as info:
        read_tiff(path)
    assert info.value.path == str(tmp_path / "s.txt")
    with pytest.raises(FormatError, match="energy file not found"):
        read_tiff(path, energies=tmp_path / "missing.txt")
    with pytest.raises(FormatError, match="no energies"):
        parse_energy_text("# nothing here\n", "x.txt")


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.01, 0.1, 0.5, 0.9])
def test_truncated_tiff(tmp_path, keep):
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, _stack(), photometric="minisblack")
    data = path.read_bytes()
    path.write_bytes(data[: int(keep * len(data))])
    with pytest.raises(FormatError, match=r"truncated|corrupt|no image") as info:
        read_tiff(path, energies=ENERGIES)
    assert info.value.path == str(path)


def test_corrupt_compressed_data(tmp_path):
    path = tmp_path / "z.tif"
    tifffile.imwrite(path, _stack(shape=(5, 64, 64)), photometric="minisblack", compression="zlib")
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        start = tif.pages[1].dataoffsets[0]
    data[start + 10 : start + 60] = b"\xff" * 50  # inside page 1's deflate stream
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"corrupt, .*: error: Error -3 while decompressing") as info:
        read_tiff(path, energies=ENERGIES)
    assert info.value.path == str(path)


def test_rgb_pages_refused(tmp_path):
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, np.zeros((3, 4, 5), np.uint8), photometric="rgb", planarconfig="separate")
    with pytest.raises(FormatError, match="one 2-D greyscale image per energy"):
        read_tiff(path, energies=[1.0, 2.0, 3.0])


def test_folder_mismatches(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    tifffile.imwrite(folder / "a1.tif", np.zeros((4, 5), np.uint16))
    tifffile.imwrite(folder / "a2.tif", np.zeros((4, 6), np.uint16))
    with pytest.raises(FormatError, match=r"image shape \(4, 6\) differs") as info:
        read_tiff(folder, energies=[1.0, 2.0])
    assert info.value.path == str(folder / "a2.tif")
    tifffile.imwrite(folder / "a2.tif", np.zeros((4, 5), np.uint16))
    data = (folder / "a2.tif").read_bytes()
    (folder / "a2.tif").write_bytes(data[:-30])
    with pytest.raises(FormatError, match="truncated") as info:
        read_tiff(folder, energies=[1.0, 2.0])
    assert info.value.path == str(folder / "a2.tif")
    with pytest.raises(FormatError, match="2 TIFF files for 3 energies"):
        read_tiff(folder, energies=[1.0, 2.0, 3.0])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FormatError, match="no TIFF files"):
        read_stack(empty, energies=[1.0])
    with pytest.raises(FormatError, match="no such file"):
        read_stack(tmp_path / "nope.tif", energies=[1.0])


def test_unknown_format(tmp_path):
    path = tmp_path / "s.dat"
    path.write_bytes(b"hello world")
    with pytest.raises(FormatError, match="unknown stack format"):
        read_stack(path)
    with pytest.raises(FormatError, match="no reader for format 'png'"):
        read_stack(path, format="png")


def test_absurd_size_refused_before_reading(tmp_path):
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, _stack(dtype=np.uint32), photometric="minisblack")
    # a corrupt header: page 0 claims 60000 x 60000 pixels (5 pages x 14 GB as float64)
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        offsets = [(tags[name].valueoffset, tags[name].dtype) for name in ("ImageWidth", "ImageLength")]
    data = bytearray(path.read_bytes())
    for offset, dtype in offsets:
        fmt = "<I" if dtype == 4 else "<H"
        struct.pack_into(fmt, data, offset, 60000)
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="over the 16 GiB bound"):
        read_tiff(path, energies=ENERGIES)


def test_the_stack_says_where_its_images_lie_as_stored(tmp_path):
    images = np.random.default_rng(3).integers(0, 4000, size=(3, 4, 5)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", images, photometric="minisblack")
    stack = read_tiff(tmp_path / "stack.tif", energies=[705.0, 706.0, 707.0])
    assert stack.tiff == TiffSource((tmp_path / "stack.tif",), "<u2")
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, image in enumerate(images):
        tifffile.imwrite(folder / f"img_{i + 1}.tif", image)
    stack = read_tiff(folder, energies=[705.0, 706.0, 707.0])
    assert stack.tiff == TiffSource(tuple(folder / f"img_{i}.tif" for i in (1, 2, 3)), "<u2")
    tifffile.imwrite(folder / "img_3.tif", images[2].astype(np.float32))  # pixel types differ: no one stored type
    assert read_tiff(folder, energies=[705.0, 706.0, 707.0]).tiff is None


def _ome(size_yx: tuple[int, int], planes: list[str], *, uuid: str = "urn:uuid:11111111-2222-3333-4444-555555555555"):
    """OME-XML for an uint16 T stack whose TiffData elements are ``planes``."""
    return ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
            f'UUID="{uuid}"><Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYZCT" Type="uint16" '
            f'SizeX="{size_yx[1]}" SizeY="{size_yx[0]}" SizeZ="1" SizeC="1" SizeT="{len(planes)}">'
            + "".join(planes) + "</Pixels></Image></OME>")


def test_ome_planes_in_another_order_than_the_pages_are_copied(tmp_path):
    """OME-XML may map its planes to the pages in any order: tifffile's default series (what Tiled's TIFF
    adapter returns) is then not the pages, and leaving the images in the file would pair frames with the
    wrong energies. The pages are read in their order (one per energy) and the images copied."""
    images = np.stack([np.full((8, 8), 100 * (i + 1), np.uint16) for i in range(3)])
    xml = _ome((8, 8), [f'<TiffData FirstT="{t}" IFD="{2 - t}" PlaneCount="1"/>' for t in range(3)])
    path = tmp_path / "reordered.ome.tif"
    tifffile.imwrite(path, images, description=xml, metadata=None, photometric="minisblack")
    assert tifffile.imread(path)[0, 0, 0] == 300  # the oracle: the default reading is the OME order
    stack = read_tiff(path, energies=[705.0, 706.0, 707.0])
    np.testing.assert_array_equal(np.asarray(stack.images[:]), images.astype(np.float32))  # page i at energy i
    assert stack.tiff is None  # not left in the file: Tiled would read the frames in the other order
    plain = tmp_path / "plain.tif"  # the same pages without OME-XML stay where they are
    tifffile.imwrite(plain, images, photometric="minisblack")
    assert read_tiff(plain, energies=[705.0, 706.0, 707.0]).tiff == TiffSource((plain,), "<u2")


@pytest.mark.parametrize("where", ["beside", "elsewhere"])
@pytest.mark.parametrize("layout", ["file", "folder"])
def test_ome_file_names_open_no_other_file(tmp_path, where, layout):
    """OME-XML's UUID FileName makes tifffile open other files, named relative to the TIFF or absolutely
    (``../x``, ``/etc/...``): a TIFF chosen for import must be read alone."""
    import sys

    elsewhere = tmp_path / "private"
    elsewhere.mkdir()
    named = (tmp_path / "data" if where == "beside" else elsewhere) / "other.ome.tif"
    named.parent.mkdir(exist_ok=True)
    images = np.stack([np.full((8, 8), 10 * (i + 1), np.uint16) for i in range(2)])
    tifffile.imwrite(named, images[:1], photometric="minisblack")
    file_name = named.name if where == "beside" else str(named)
    planes = ['<TiffData FirstT="0" IFD="0" PlaneCount="1"/>',
              f'<TiffData FirstT="1" PlaneCount="1"><UUID FileName="{file_name}">'
              'urn:uuid:99999999-2222-3333-4444-555555555555</UUID></TiffData>']
    target = tmp_path / "data" / "stack.ome.tif"
    target.parent.mkdir(exist_ok=True)
    pages = images if layout == "file" else images[:1]
    tifffile.imwrite(target, pages, description=_ome((8, 8), planes), metadata=None, photometric="minisblack")
    opened: list[str] = []
    watching = [True]

    def hook(event, args):
        if watching[0] and event == "open" and isinstance(args[0], str | bytes):
            opened.append(str(args[0]))

    sys.addaudithook(hook)  # hooks stay for the process: this one records only while watching
    try:
        if layout == "file":
            stack = read_tiff(target, energies=[705.0, 706.0])
        else:
            count = 2 if where == "beside" else 1  # stack.ome.tif, and other.ome.tif beside it
            stack = read_tiff(target.parent, energies=[705.0, 706.0][:count])
        np.asarray(stack.images[:])
    finally:
        watching[0] = False
    others = {p for p in opened if p.endswith(".tif") and "other" in p}
    if layout == "file" or where == "elsewhere":
        assert others == set(), f"opened {others}"
    else:  # a folder stack reads each of its files, other.ome.tif among them, itself
        assert others == {str(named)}
    assert stack.tiff is None


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_strips_without_data_are_refused_not_read_as_zeros(tmp_path, compression):
    """A sparse TIFF (strips or tiles of byte count 0) reads as zeros in tifffile: counts never recorded."""
    images = np.random.default_rng(2).integers(100, 4000, (2, 64, 64)).astype(np.uint16)
    path = tmp_path / "sparse.tif"
    tifffile.imwrite(path, images, photometric="minisblack", rowsperstrip=16, compression=compression)
    with tifffile.TiffFile(path, mode="r+") as tif:  # page 1's second strip made sparse: offset and count 0
        for name in ("StripOffsets", "StripByteCounts"):
            tag = tif.pages[1].tags[name]
            values = list(tag.value)
            values[1] = 0
            tag.overwrite(values)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[1].databytecounts[1] == 0
        assert (tif.pages[1].asarray()[16:32] == 0).all()  # the oracle: tifffile's zeros
    with pytest.raises(FormatError, match="page 1 has 1 of 4 strips or tiles without data"):
        read_tiff(path, energies=[705.0, 706.0])


def _zeros(path, pages: int, shape=(1024, 1024)) -> None:
    """``pages`` pages of zeros, deflated about 1000-fold (deflate's ceiling)."""
    with tifffile.TiffWriter(path) as tif:
        for _ in range(pages):
            tif.write(np.zeros(shape, np.uint16), photometric="minisblack", compression="zlib",
                      compressionargs={"level": 9})


def test_a_decompression_bomb_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    """Pages that declare far more pixels than their compressed bytes hold (a few kB of zlib for 16 MiB):
    refused from the byte counts, before any page is decoded (a 1.2 MB file allocated 3 GiB before)."""
    path = tmp_path / "bomb.tif"
    _zeros(path, 8)
    with tifffile.TiffFile(path) as tif:  # the oracle: what the file stores and what it declares
        stored = sum(sum(page.databytecounts) for page in tif.pages)
        declared = sum(page.size * page.dtype.itemsize for page in tif.pages)
    assert declared > MAX_EXPANSION * stored + EXPANSION_ALLOWANCE
    decoded = []
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda self, *a, **k: decoded.append(self) or None)
    monkeypatch.setattr(tifffile.TiffFile, "asarray", lambda self, *a, **k: decoded.append(self) or None)
    problem = rf"the pixel data of 8 pages declares 16\.0 MiB but stores {stored} bytes"
    with pytest.raises(FormatError, match=problem) as info:
        read_tiff(path, energies=np.arange(700.0, 708.0))
    assert info.value.path == str(path) and decoded == []


def test_a_decompression_bomb_in_a_folder_is_refused_naming_its_file(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    tifffile.imwrite(folder / "img_0.tif", _stack(shape=(1024, 1024)), photometric="minisblack", compression="zlib")
    _zeros(folder / "img_1.tif", 1)
    with pytest.raises(FormatError, match=r"the pixel data of 1 page declares 2\.0 MiB but stores") as info:
        read_tiff(folder, energies=[705.0, 706.0])
    assert info.value.path == str(folder / "img_1.tif")
