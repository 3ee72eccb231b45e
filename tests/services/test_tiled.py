"""Tiled helpers against a real embedded Tiled server and a real RunEngine; oracle: the NumPy arrays written."""

import hashlib
import re
import socket

import numpy as np
import pytest
import zarr
from bluesky import RunEngine
from bluesky_tiled_plugins import BlueskyRun
from event_model import compose_run
from tiled.queries import Key

from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.catalog import find
from phasestream.store.odstore import PlaneReader, check_od_store, external_source, new_od_zarr, plane_structure
from phasestream.store.results import ResultExistsError, ResultWriter
from phasestream.store.tiled import (
    TiledConnectionError,
    TiledPermissionError,
    _resolve_api_key,
    connect,
    open_raw_run,
    raw_run_complete,
    raw_run_writer,
    start_embedded_tiled,
)

KEY = "phasestreamTestKey1"
SHAPE = (8, 6)
PHASES = ["Na3.0", "Na2.0", "Na1.0"]


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    """A folder the server may read: external ``od`` arrays (``ResultWriter(od_store=...)``) go there."""
    return tmp_path_factory.mktemp("od-store")


@pytest.fixture(scope="module")
def server(store_root):
    server = start_embedded_tiled(api_key=KEY, readable_storage=[store_root])
    yield server
    server.close()


@pytest.fixture(params=["uploaded", "external"])
def od_store(request, store_root):
    """Where ``od`` goes: uploaded into Tiled's storage, or written by the writer as external zarr data."""
    return None if request.param == "uploaded" else store_root


def uid_for(name, od_store):
    return f"{name}-{'external' if od_store else 'uploaded'}"


def assert_grown_od(client, uid, od_store, planes):
    """``od`` past its planned size holds ``planes``: uploaded it grows by exactly the new planes,
    external it grows geometrically (each growth is a new registration), one chunk per plane."""
    od = client[f"phasestream/{uid}/od"]
    n = len(planes)
    assert od.shape[0] == n if od_store is None else n <= od.shape[0] <= 2 * n
    assert od.shape[1:] == SHAPE and od.chunks[0] == (1,) * od.shape[0]
    np.testing.assert_array_equal(od[:n], planes)  # NaN compares equal here


def assert_od_kept_as(client, uid, od_store):
    """``od`` is external zarr data in the store exactly when the writer was given one."""
    (source,) = client[f"phasestream/{uid}/od"].data_sources()
    assert (source.management == "external") == (od_store is not None)
    if od_store is not None:
        assert source.mimetype == "application/x-zarr"
        assert (od_store / "phasestream" / uid / "od.zarr" / "zarr.json").is_file()


@pytest.fixture(scope="module")
def client(server):
    return connect(server.uri)


@pytest.fixture
def no_env_key(monkeypatch):
    monkeypatch.delenv("TILED_API_KEY", raising=False)


def base_uri(server):
    return server.uri.split("?")[0]


def result_md(state_of_charge, **fields):
    return {
        "scan_id": 7,
        "sample": {"name": "particle-1", "state_of_charge": state_of_charge},
        "energies_eV": [506.0, 517.5, 525.0],
        "references": {"name": "nvpf-synthetic"},
        **fields,
    }


def writer(client, uid, *, soc=2.0, **kwargs):
    kwargs.setdefault("metadata", result_md(soc))
    return ResultWriter(client, uid, shape=SHAPE, phases=PHASES, **kwargs)


# ---------------------------------------------------------------- server, connection, authentication


def test_embedded_server_listens_on_localhost_with_its_key(server):
    assert server.uri.startswith("http://127.0.0.1:")
    assert server.uri.endswith(f"?api_key={KEY}")


def test_api_key_is_the_argument_then_the_environment_then_random(monkeypatch):
    with pytest.raises(ValueError, match="letters and digits"):
        start_embedded_tiled(api_key="not-alphanumeric")
    monkeypatch.setenv("TILED_API_KEY", "from-env")
    assert _resolve_api_key("given") == "given"
    assert _resolve_api_key(None) == "from-env"
    monkeypatch.delenv("TILED_API_KEY")
    first, second = _resolve_api_key(None), _resolve_api_key(None)
    assert first != second and len(first) == 32


def test_connect_takes_the_key_from_uri_argument_or_environment(server, monkeypatch, no_env_key):
    assert "phasestream" not in connect(server.uri, api_key=KEY)  # key in the URI and as argument: no clash
    assert connect(base_uri(server), api_key=KEY).context.api_key == KEY
    monkeypatch.setenv("TILED_API_KEY", KEY)
    assert connect(base_uri(server)).context.api_key == KEY


def test_connect_names_an_unreachable_server():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TiledConnectionError, match=f"127.0.0.1:{port}"):
        connect(f"http://127.0.0.1:{port}/api/v1?api_key=secret")


def test_the_api_key_is_required_to_write(server, client, no_env_key):
    with pytest.raises(TiledPermissionError, match="requires an API key"):
        connect(base_uri(server))
    with pytest.raises(TiledPermissionError, match="rejected the API key"):
        connect(base_uri(server), api_key="wrong")
    intruder = connect(server.uri)
    for key in ("wrong", None):
        intruder.context.api_key = key
        with pytest.raises(TiledPermissionError, match="valid API key"):
            writer(intruder, "run-intruder", root="intruded")
    assert "intruded" not in client


# ---------------------------------------------------------------- result layout and arrays


def test_result_container_layout_specs_and_metadata(client):
    writer(client, "run-layout", n_energies=4)
    result = client["phasestream"]["run-layout"]
    assert [spec.name for spec in result.specs] == ["PhaseMap"]
    md = result.metadata
    assert md["run_uid"] == "run-layout" and md["scan_id"] == 7
    assert md["status"] == "running" and md["n_energies_seen"] == 0 and md["errors"] == []
    assert md["state_of_charge"] == 2.0 and isinstance(md["state_of_charge"], float)  # taken from sample
    assert md["references"] == {"name": "nvpf-synthetic", "phases": PHASES}
    od = result["od"]
    assert od.shape == (4, *SHAPE) and od.dtype == np.float32
    assert od.chunks == ((1, 1, 1, 1), (SHAPE[0],), (SHAPE[1],))
    assert "run-layout" in client["phasestream"].search(Key("state_of_charge") == 2.0)


def test_od_planes_read_back_as_written_also_past_the_planned_size(client, od_store):
    uid = uid_for("run-od-grow", od_store)
    planes = np.random.default_rng(0).normal(size=(5, *SHAPE)).astype(np.float32)
    planes[1, 2:4, 3] = np.nan
    w = writer(client, uid, od_store=od_store, n_energies=3)
    for index in (0, 2, 1, 3, 4):
        w.write_od(index, planes[index])
    assert w.n_od_planes == 5
    assert_grown_od(client, uid, od_store, planes)
    assert_od_kept_as(client, uid, od_store)
    w.finalize_od()
    assert client[f"phasestream/{uid}"].metadata["n_energies_seen"] == 5
    np.testing.assert_array_equal(client[f"phasestream/{uid}/od"].read(), planes)  # exactly 5 planes now


def test_od_of_unknown_length_grows_from_the_first_plane(client, od_store):
    uid = uid_for("run-od-unknown", od_store)
    planes = np.random.default_rng(1).random((3, *SHAPE))  # float64 in, float32 stored
    w = writer(client, uid, od_store=od_store, n_energies=None)
    assert "od" not in client[f"phasestream/{uid}"]
    for index, plane in enumerate(planes):
        w.write_od(index, plane)
    assert_grown_od(client, uid, od_store, planes.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        w.write_od(3, planes[0][:-1])


def test_od_planes_written_in_blocks_read_back_as_written_also_past_the_planned_size(client, od_store):
    uid = uid_for("run-od-blocks", od_store)
    planes = np.random.default_rng(4).normal(size=(7, *SHAPE)).astype(np.float32)
    planes[2, 1, 1] = np.nan
    w = writer(client, uid, od_store=od_store, n_energies=4)
    w.write_od_planes(0, planes[:3])
    w.write_od_planes(3, planes[3:4])
    w.write_od_planes(4, planes[4:])  # past the planned 4 planes: grows
    assert w.n_od_planes == 7
    assert_grown_od(client, uid, od_store, planes)
    with pytest.raises(ValueError, match="shape"):
        w.write_od_planes(7, planes[:2, :-1])


def test_maps_and_od_planes_are_written_together(client, od_store):
    uid = uid_for("run-maps-od", od_store)
    rng = np.random.default_rng(5)
    planes = rng.random((3, *SHAPE)).astype(np.float32)
    maps = {"pcc": rng.uniform(-1, 1, (3, *SHAPE)).astype(np.float32), "mask": np.ones(SHAPE, np.uint8)}
    w = writer(client, uid, od_store=od_store, n_energies=None)
    w.write_od(0, planes[0])
    w.write_maps(**maps)
    w.write_maps(od_planes=(1, planes[1:]), **{name: value[::-1].copy() for name, value in maps.items()})
    result = client[f"phasestream/{uid}"]
    np.testing.assert_array_equal(result["od"].read(), planes)
    np.testing.assert_array_equal(result["pcc"].read(), maps["pcc"][::-1])


def test_finalize_trims_od_of_an_aborted_scan(client, od_store):
    uid = uid_for("run-od-trim", od_store)
    planes = np.random.default_rng(2).random((3, *SHAPE)).astype(np.float32)
    w = writer(client, uid, od_store=od_store, n_energies=6)
    for index, plane in enumerate(planes):
        w.write_od(index, plane)
    w.finalize_od()
    result = client[f"phasestream/{uid}"]
    assert result.metadata["n_energies_seen"] == 3
    assert result["od"].chunks[0] == (1, 1, 1)
    np.testing.assert_array_equal(result["od"].read(), planes)
    assert_od_kept_as(client, uid, od_store)
    # the trimmed cube reads back as written (the planes were verified, or keep their digests)
    assert w.read_back({}, 3) == {"od": hashlib.sha256(planes.tobytes()).hexdigest()}
    with pytest.raises(ValueError, match="holds 3 planes"):
        w.finalize_od(4)
    w.finalize_od(0)  # nothing usable: no od at all, and no files left behind
    assert "od" not in client[f"phasestream/{uid}"] and w.n_od_planes == 0
    if od_store is not None:
        assert not (od_store / "phasestream" / uid).exists()


def test_od_store_is_checked_to_be_served_by_tiled(client, store_root, tmp_path, monkeypatch):
    assert check_od_store(client, store_root) == store_root.resolve()
    monkeypatch.setattr("tiled.client.utils.TILED_RETRY_ATTEMPTS", 1)  # the refusal is a 500: don't retry it
    # a folder outside the server's readable_storage: Tiled would register it but never serve it
    with pytest.raises(PermissionError, match="readable_storage"):
        check_od_store(client, tmp_path)
    for folder in (store_root, tmp_path):  # the check leaves nothing behind
        assert not any(p.name.startswith("phasestream-od-store-check") for p in folder.iterdir())
    assert not [key for key in client if key.startswith("phasestream-od-store-check")]


@pytest.mark.parametrize("direct", [True, False], ids=["o-direct", "read-and-drop"])
def test_od_planes_are_read_from_their_chunk_files_as_zarr_stores_them(tmp_path, direct):
    """The live read-back of an external ``od`` reads each plane's chunk file itself (with O_DIRECT where the file
    system takes it): the bytes must be the plane as zarr stores it and reads it back; a file that is not one
    plane is no plane."""
    planes = np.random.default_rng(3).normal(size=(3, 37, 29)).astype(np.float32)  # 4292 bytes: not whole pages
    array = new_od_zarr(tmp_path / "od.zarr", planes.shape)
    array[:] = planes
    assert PlaneReader.stored_as_bytes(array)
    reader = PlaneReader(planes[0].nbytes)
    reader._direct = direct and reader._direct
    for index in range(3):
        got = reader.read(tmp_path / "od.zarr" / array.metadata.encode_chunk_key((index, 0, 0)))
        np.testing.assert_array_equal(got.view(np.float32).reshape(37, 29), zarr.open_array(
            str(tmp_path / "od.zarr"))[index])
    (tmp_path / "short").write_bytes(b"\0" * (planes[0].nbytes - 4))
    assert reader.read(tmp_path / "short") is None
    compressed = zarr.create_array(str(tmp_path / "c.zarr"), shape=planes.shape, chunks=(1, 37, 29), dtype="f4")
    assert not PlaneReader.stored_as_bytes(compressed)  # zarr's default codecs compress: read through zarr


def test_maps_are_written_with_contract_dtypes_and_overwritten_in_place(client):
    rng = np.random.default_rng(3)
    w = writer(client, "run-maps")
    first = {
        "pcc": rng.uniform(-1, 1, (3, *SHAPE)),
        "phase": rng.integers(-1, 3, SHAPE),  # int64 -> int16
        "reliability": rng.random(SHAPE).astype(np.float32),
        "ambiguous": rng.random(SHAPE) > 0.5,  # bool -> uint8
        "mask": np.ones(SHAPE, bool),
        "extra_counts": np.arange(4, dtype=np.int32),
    }
    first["reliability"][0, :] = np.nan
    w.write_maps(**first)
    result = client["phasestream/run-maps"]
    source_ids = {name: result[name].data_sources()[0].id for name in first}
    second = {name: value[::-1].copy() for name, value in first.items()}
    w.write_maps(**second)
    expected_dtypes = {
        "pcc": "float32",
        "phase": "int16",
        "reliability": "float32",
        "ambiguous": "uint8",
        "mask": "uint8",
        "extra_counts": "int32",
    }
    for name, value in second.items():
        stored = result[name]
        assert stored.dtype == np.dtype(expected_dtypes[name]), name
        assert stored.data_sources()[0].id == source_ids[name], f"{name} was recreated, not overwritten"
        np.testing.assert_array_equal(stored.read(), value.astype(expected_dtypes[name]))
    w.write_maps(extra_counts=np.arange(6, dtype=np.int32))  # new shape: replaced
    np.testing.assert_array_equal(result["extra_counts"].read(), np.arange(6))
    with pytest.raises(ValueError, match=r"'pcc'.*\(3, 8, 6\)"):
        w.write_maps(pcc=np.zeros((4, *SHAPE), np.float32))
    with pytest.raises(TypeError, match="int16"):
        w.write_maps(phase=np.zeros(SHAPE, np.float32))


def test_metadata_updates_merge_top_level_keys(client):
    w = writer(client, "run-md")
    w.update_metadata(
        status="complete",
        phase_fractions={"Na2.0": 0.75, "Na3.0": 0.25},
        ambiguous_fraction=np.float32(0.125),
        timings={"pcc_s": float("nan")},
    )
    w.record_error("energy 560.0 eV outside the reference range")
    w.update_metadata(sample={"name": "particle-2"})  # shallow: the whole sample is replaced
    md = client["phasestream/run-md"].metadata
    assert md["status"] == "complete" and md["scan_id"] == 7 and md["energies_eV"] == [506.0, 517.5, 525.0]
    assert md["phase_fractions"] == {"Na2.0": 0.75, "Na3.0": 0.25} and md["ambiguous_fraction"] == 0.125
    assert md["timings"] == {"pcc_s": None}
    assert md["errors"] == ["energy 560.0 eV outside the reference range"]
    assert md["sample"] == {"name": "particle-2"} and md["state_of_charge"] == 2.0
    assert dict(w.metadata) == dict(md)
    with pytest.raises(ValueError, match="status"):
        w.update_metadata(status="done")


def test_errors_another_process_appended_stay_when_the_writer_updates_its_own(client):
    """The live writer sends its whole ``errors`` list with each update; a note another process appended
    meanwhile (a second worker's conflict note, a recovery's reason) was lost with the next update."""
    w = writer(client, "run-errors")
    w.update_metadata(errors=["plane 3: energy missing"])
    ResultWriter.open(client, "run-errors").record_error("a note from another process")
    w.update_metadata(errors=["plane 3: energy missing", "writing the mask failed"], status="partial")
    assert client["phasestream/run-errors"].metadata["errors"] == [
        "plane 3: energy missing", "a note from another process", "writing the mask failed"]
    reopened = ResultWriter.open(client, "run-errors")  # a reopened result's list is written whole
    reopened.update_metadata(errors=["only this"])
    assert client["phasestream/run-errors"].metadata["errors"] == ["only this"]


def test_a_note_another_update_took_back_is_appended_again(client):
    """Tiled applies a metadata patch by reading the node's metadata and writing it whole. A process that read the
    result before another process's note went in (a conflict note, a recovery's reason) and wrote after it took
    the note back, and nothing sent it again. The note is now read back and appended again."""
    w = writer(client, "run-note-raced")
    w.update_metadata(errors=["plane 3: energy missing"])
    noting = ResultWriter.open(client, "run-note-raced")
    node, patch, taken_back = client["phasestream/run-note-raced"], noting.container.patch_metadata, []

    def raced(**kwargs):
        stale = dict(node.refresh().metadata)  # another process reads the metadata ...
        patch(**kwargs)
        if not taken_back:
            node.replace_metadata(metadata=stale)  # ... and writes it whole after the note went in
            taken_back.append(stale["errors"])

    noting.container.patch_metadata = raced
    noting.record_error("a second worker writes this run")
    assert taken_back == [["plane 3: energy missing"]]
    assert node.refresh().metadata["errors"] == ["plane 3: energy missing", "a second worker writes this run"]
    noting.record_error("a second worker writes this run")  # a note held at once is appended once
    assert node.refresh().metadata["errors"] == ["plane 3: energy missing"] + ["a second worker writes this run"] * 2


def test_an_entry_another_process_removed_in_the_same_instant_is_removed_at_once(client):
    """``update_entries`` removes a job's own entry from a shared map. When another process removed it between the
    read and the patch, the JSON patch's remove failed: Tiled answered 500, its client retried for 25 s, and the
    job failed. The entry is now added and removed in the one patch, which holds whether or not it is there."""
    import time

    w = writer(client, "run-entries-raced")
    w.update_metadata(models={"a": {"version": "1"}, "b": {"version": "2"}})
    node, read = client["phasestream/run-entries-raced"], w.fresh_metadata

    def raced():
        held = read()  # the job reads the map ...
        node.patch_metadata(metadata_patch=[{"op": "remove", "path": "/models/a"}])  # ... another removes its entry
        return held

    w.fresh_metadata = raced
    t0 = time.monotonic()
    w.update_entries({"models": {"c": {"version": "3"}}}, removed={"models": ["a", "b"]})
    assert time.monotonic() - t0 < 5
    assert node.refresh().metadata["models"] == {"c": {"version": "3"}}


@pytest.mark.slow  # make test-stack: Tiled answers the append 500, which its client retries for 25 s
def test_errors_edited_by_hand_into_no_list_are_set_whole_by_the_writer(client):
    w = writer(client, "run-errors-text")
    w.update_metadata(errors=["plane 3: energy missing"])
    node = client["phasestream/run-errors-text"]  # edited by hand into a text: no list to append to
    node.replace_metadata(metadata={**dict(node.metadata), "errors": "see the logbook"})
    w.update_metadata(errors=["plane 3: energy missing", "stopped"], status="partial")
    md = node.refresh().metadata
    assert md["errors"] == ["plane 3: energy missing", "stopped"] and md["status"] == "partial"


def test_existing_results_are_refused_replaced_or_reopened(client, od_store):
    uid = uid_for("run-again", od_store)
    w = writer(client, uid, od_store=od_store, n_energies=2)
    w.write_od(0, np.ones(SHAPE))
    w.update_metadata(status="failed")
    with pytest.raises(ResultExistsError, match="replace=True"):
        writer(client, uid, od_store=od_store)
    reopened = ResultWriter.open(client, uid, od_store=od_store)
    assert reopened.shape == SHAPE and reopened.phases == PHASES
    reopened.write_od(1, np.full(SHAPE, 2.0))
    np.testing.assert_array_equal(client[f"phasestream/{uid}/od"].read()[:, 0, 0], [1.0, 2.0])
    assert_od_kept_as(client, uid, od_store)
    writer(client, uid, od_store=od_store, soc=1.0, replace=True)
    result = client[f"phasestream/{uid}"]
    assert list(result) == [] and result.metadata["status"] == "running" and result.metadata["state_of_charge"] == 1.0
    if od_store is not None:  # Tiled never deletes external data: the writer removed the old files
        assert not (od_store / "phasestream" / uid).exists()
    with pytest.raises(KeyError, match="no result"):
        ResultWriter.open(client, "run-never")


def test_a_reopened_result_writes_its_external_od_only_where_the_od_store_puts_it(client, store_root):
    """``ResultWriter.open`` took the external ``od``'s path from Tiled and the OD store from that path: a result whose
    ``od`` named any folder called ``od.zarr`` had it written into by ``write_od`` and removed by ``finalize_od``."""
    precious = store_root / "someone" / "od.zarr"  # readable by the server, not this result's place in a store
    new_od_zarr(precious, (2, *SHAPE))[:] = 7.0
    w = writer(client, "od-elsewhere")
    w.container.new("array", [external_source(plane_structure(2, SHAPE), precious)], key="od")
    for store in (None, store_root):
        opened = ResultWriter.open(client, "od-elsewhere", od_store=store)
        with pytest.raises(OSError, match="not where this result's lies in the OD store"):
            opened.write_od(0, np.ones(SHAPE))
        with pytest.raises(OSError, match="not where this result's lies in the OD store"):
            opened.finalize_od(1)
    np.testing.assert_array_equal(zarr.open_array(str(precious))[:], np.full((2, *SHAPE), 7.0))


def test_replacing_without_that_od_store_leaves_its_files(client, store_root):
    """The path of an external od comes from Tiled: a writer removes it only inside its own OD store
    (``reprocess`` replaces with no OD store; another worker's store is not its to empty)."""
    uid = "run-replaced-elsewhere"
    w = writer(client, uid, od_store=store_root, n_energies=2)
    w.write_od(0, np.ones(SHAPE))
    files = store_root / "phasestream" / uid / "od.zarr"
    other = store_root / "another-store"
    other.mkdir(exist_ok=True)
    for od_store in (None, other):
        writer(client, uid, od_store=od_store, replace=True, n_energies=2).write_od(0, np.ones(SHAPE))
        assert files.is_dir() and list(client[f"phasestream/{uid}"]) == ["od"]
    # the result's od now lies in `other`: a writer of that store removes it there
    assert (other / "phasestream" / uid / "od.zarr").is_dir()
    writer(client, uid, od_store=other, replace=True)
    assert not (other / "phasestream" / uid).exists() and files.is_dir()


# ---------------------------------------------------------------- search


def test_results_are_found_by_state_of_charge_and_status(client):
    root = "search-test"
    for uid, soc, status in [
        ("a", 2.0, "complete"),
        ("b", 2.05, "complete"),
        ("c", 2.4, "running"),
        ("d", 1.0, "complete"),
    ]:
        writer(client, uid, root=root, metadata=result_md(soc, status=status))
    assert set(client[root].search(Key("state_of_charge") == 2.0)) == {"a"}
    assert set(find(client, state_of_charge=2.0, root=root)) == {"a"}
    assert set(find(client, state_of_charge=2, root=root)) == {"a"}
    assert set(find(client, state_of_charge=2.0, tolerance=0.1, root=root)) == {"a", "b"}
    assert set(find(client, state_of_charge=2.2, tolerance=0.3, status="complete", root=root)) == {"a", "b"}
    assert set(find(client, status="running", root=root)) == {"c"}
    assert find(client, state_of_charge=3.0, root=root) == {}
    assert find(client, state_of_charge=2.0, root="no-such-root") == {}
    found = find(client, state_of_charge=1.0, root=root)
    assert found["d"].metadata["sample"]["state_of_charge"] == 1.0


# ---------------------------------------------------------------- raw runs


def test_raw_runs_round_trip_through_tiled_writer(client):
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client))
    sample = make_sample((32, 32), seed=1)
    energy = make_energy()
    det = TransmissionDetector(sample, energy)
    docs = []
    (uid,) = RE(
        energy_stack_scan([det], energy, [506.0, 517.5, 525.0], sample=sample),
        lambda name, doc: docs.append((name, doc)),
    )
    run = open_raw_run(client, uid)
    assert isinstance(run, BlueskyRun)
    expected = np.stack([doc["data"]["det_img"] for name, doc in docs if name == "event"])
    stored = run["primary"]["det_img"].read()
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(stored, expected)
    assert run.start["sample"]["state_of_charge"] == sample.state_of_charge
    assert raw_run_complete(client, uid)


def test_a_raw_run_is_complete_once_its_stop_document_is_written(client):
    bundle = compose_run(metadata={"sample": {"name": "x", "state_of_charge": 2.4}})
    write = raw_run_writer(client)
    write("start", bundle.start_doc)
    uid = bundle.start_doc["uid"]
    assert not raw_run_complete(client, uid)
    write("stop", bundle.compose_stop())
    assert raw_run_complete(client, uid)
    with pytest.raises(KeyError, match="no raw run"):
        open_raw_run(client, "no-such-run")
    writer(client, "run-not-raw")
    with pytest.raises(TypeError, match="not a BlueskyRun"):
        open_raw_run(client["phasestream"], "run-not-raw")


def test_a_reopened_result_whose_errors_are_not_a_list_gets_a_list_quoting_them(client):
    """record_error appends to the result's ``errors`` on the server; a value that is not a list (edited by hand)
    made every append a 500 that the client retried for 25 s: the worker's recovery never finalized such a
    result, and a replayed start document stalled the live writes. Reopening it makes the list, quoting it."""
    import time

    ResultWriter(client, "errors-not-a-list", shape=None, phases=[], metadata={"errors": "x"})
    writer = ResultWriter.open(client, "errors-not-a-list")
    t0 = time.monotonic()
    writer.record_error("the next error")
    assert time.monotonic() - t0 < 5
    assert client["phasestream"]["errors-not-a-list"].metadata["errors"] == [
        "errors were not a list: 'x'", "the next error"]
    for bad, said in (({"references": "nvpf"}, "references 'nvpf' is not a map"),
                      ({"image_shape": [3]}, "image_shape [3] is not two pixel counts"),
                      ({"n_energies_seen": -2}, "n_energies_seen -2 is not a count")):
        node = client["phasestream"]["errors-not-a-list"]
        node.replace_metadata(metadata={**dict(node.metadata), "references": {"phases": []}, "image_shape": None,
                                        "n_energies_seen": 0, **bad})
        with pytest.raises(ValueError, match=re.escape(said)):
            ResultWriter.open(client, "errors-not-a-list")

def test_a_closed_embedded_server_leaves_no_log_file_handler_behind(tmp_path):
    """SimpleTiledServer logs `tiled` to a file in its folder; once the folder is gone, a stale handler would
    raise FileNotFoundError in whatever code logs next (it broke the demo after the view tests)."""
    import logging

    from phasestream.store.tiled import tiled_session

    with tiled_session(directory=tmp_path / "catalog") as (client, _):
        assert "phasestream" not in client
    stale = [h for name in ("", "tiled", "uvicorn", "uvicorn.error", "uvicorn.access")
             for h in logging.getLogger(name).handlers
             if isinstance(h, logging.FileHandler) and str(tmp_path) in h.baseFilename]
    assert not stale

