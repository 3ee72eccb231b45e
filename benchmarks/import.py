"""Import rate of ``phasestream import``: a 100 x 1024^2 stack as a multi-page TIFF and as an NXstxm (HDF5)
file into an embedded Tiled server, against reading the same bytes from disk.

For each file: ``disk_read_s``, the file read once in 1 MiB blocks after its pages were dropped from the
page cache (``posix_fadvise(DONTNEED)``, a ``cat`` from disk), and ``import_s``, the import job
(:func:`phasestream.jobs.importing.run`: read the headers and check the file, SHA-256 (in a thread, beside
the first lookups), write the run through TiledWriter, read a sample of the first and last frame back),
also from a cold cache; ``ratio`` = import_s / disk_read_s (target 3), ``MB_per_s`` and ``frames_per_s`` of
the import, and its parts measured apart (``read_stack_s``, ``sha256_s``; ``write_s`` the rest: the
SHA-256 overlaps the first requests in the import, so this is a lower bound of the Tiled time). Both files
lie in the server's readable storage, so the images of both stay in their file (StreamResource /
StreamDatum; ``images: external``): the import reads headers, hashes the file, writes the documents and
reads the sample back through Tiled.

With ``--copy-images`` the images are written into Tiled instead, and the import reads the whole run back
before it says ``complete``.

Usage: ``python benchmarks/import.py [--frames 100] [--size 1024] [--repeat 2] [--copy-images]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
from nexusformat.nexus import NXdata, NXentry, NXfield, NXroot

from phasestream.formats import read_stack
from phasestream.jobs.context import JobContext
from phasestream.jobs.importing import BATCH_BYTES
from phasestream.jobs.importing import run as import_file
from phasestream.references import load_references
from phasestream.store.tiled import connect, start_embedded_tiled


def drop_cache(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (no root needed for a file one may read)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_read(path: Path) -> float:
    """Seconds to read ``path`` from disk in 1 MiB blocks (``cat > /dev/null``)."""
    drop_cache(path)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        while handle.read(1 << 20):
            pass
    return time.perf_counter() - t0


def write_file(name: str, folder: Path, frames: int, size: int, seed: int = 0) -> Path:
    """The stack as a multi-page TIFF (with ``stack.txt``, its energies) or an NXstxm file; another ``seed``
    gives other counts (a file imported again would be a no-op)."""
    refs = load_references("nvpf-synthetic")
    lo, hi = refs.energy_range
    energies = np.linspace(lo, hi, frames)
    rng = np.random.default_rng(seed)
    images = rng.poisson(5000.0, size=(frames, size, size)).astype(np.uint16)
    if name == "tiff":
        tiff = folder / "stack.tif"
        tifffile.imwrite(tiff, images, photometric="minisblack")
        (folder / "stack.txt").write_text("\n".join(repr(float(e)) for e in energies))
        return tiff
    entry = NXentry()
    entry.definition = NXfield("NXstxm")
    axes = [NXfield(energies, name="energy", units="eV"), NXfield(np.arange(size) * 0.05, name="sample_y", units="um"),
            NXfield(np.arange(size) * 0.05, name="sample_x", units="um")]
    entry.counter0 = NXdata(NXfield(images, name="data", compression=None), axes)  # the size of the TIFF
    entry.counter0.stxm_scan_type = NXfield("sample image stack")
    root = NXroot()
    root["entry0"] = entry
    nxs = folder / "stack.nxs"
    root.save(str(nxs), "w")
    return nxs


def measure(client, path: Path, frames: int, options: dict) -> dict:
    files = [path] + ([path.with_suffix(".txt")] if path.suffix == ".tif" else [])
    size = sum(p.stat().st_size for p in files)
    disk = sum(disk_read(p) for p in files)
    for p in files:
        drop_cache(p)
    t0 = time.perf_counter()
    stack = read_stack(path)
    read_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    stack.sha256()
    sha_s = time.perf_counter() - t1
    for p in files:
        drop_cache(p)
    t2 = time.perf_counter()
    outcome = import_file(JobContext(client=client), str(path), options)
    import_s = time.perf_counter() - t2
    if not outcome.ok or outcome.details.get("already_imported"):
        raise RuntimeError(f"{path}: {outcome.reason}")
    return {"file_MB": round(size / 1e6, 1), "disk_read_s": round(disk, 3), "import_s": round(import_s, 3),
            "ratio": round(import_s / disk, 2), "MB_per_s": round(size / 1e6 / import_s, 1),
            "frames_per_s": round(frames / import_s, 1), "images": outcome.details["images"],
            "read_stack_s": round(read_s, 3), "sha256_s": round(sha_s, 3),
            "write_s": round(max(import_s - read_s - sha_s, 0.0), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=2, help="imports of each file (fresh copies), best kept")
    parser.add_argument("--batch-mib", type=int, default=None, help="images per TiledWriter request, in MiB "
                        "(default: the import's, phasestream.jobs.importing.BATCH_BYTES)")
    parser.add_argument("--formats", nargs="+", default=["tiff", "nxstxm"], choices=["tiff", "nxstxm"])
    parser.add_argument("--copy-images", action="store_true",
                        help="copy the images into Tiled (phasestream import --copy-images) instead of leaving them")
    args = parser.parse_args()
    report: dict = {"benchmark": "import", "frames": args.frames, "size": args.size,
                    "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                "load_1min": round(os.getloadavg()[0], 2)}}
    with tempfile.TemporaryDirectory(dir=os.environ.get("PHASESTREAM_BENCH_DIR")) as tmp:
        folder = Path(tmp)
        server = start_embedded_tiled(directory=folder / "tiled", readable_storage=[folder / "files"])
        try:
            client = connect(server.uri)
            options = {"references": "nvpf-synthetic", "external": not args.copy_images}
            if args.batch_mib is not None:
                options["batch_bytes"] = args.batch_mib * 2**20
            report["batch_bytes"] = options.get("batch_bytes", BATCH_BYTES)
            for name in args.formats:
                best = None
                for i in range(args.repeat):
                    files_dir = folder / "files" / f"{name}{i}"
                    files_dir.mkdir(parents=True)
                    result = measure(client, write_file(name, files_dir, args.frames, args.size, seed=i), args.frames,
                                     options)
                    best = result if best is None or result["import_s"] < best["import_s"] else best
                report[name] = best
        finally:
            server.close()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
