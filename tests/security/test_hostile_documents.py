"""Hostile and broken start documents against the worker's real components.

A RunEngine writes honest raw runs into a real embedded Tiled (TiledWriter); the documents that
reach the worker (:class:`LiveService`, the object ``phasestream serve`` runs) are then changed as
an attacker on the unauthenticated 0MQ socket, or a typo in a beamline profile, would change
them. Each test lists the whole catalog before and after (every node, its metadata and its
data) and checks that nothing outside the run's own result was written or deleted, and that the
worker still analyses a good scan afterwards. The listing holds every node's metadata and
structure, and the data itself of the honest raw run and of its complete result, the target the
hostile documents aim at (reading every array of a growing catalog would make the suite slow).
"""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable

import numpy as np
import pytest
from bluesky import RunEngine

from phasestream.app.live import LiveService
from phasestream.callbacks.phase_map import PhaseMapCallback
from phasestream.callbacks.unanalysed import MAX_CONFLICT_NOTES
from phasestream.contract import DocumentBounds
from phasestream.references import load_references, select_energies
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.results import ResultWriter
from phasestream.store.tiled import raw_run_writer
from phasestream.transport.wire import ENVELOPE_TAG, pack_frame, serialize
from phasestream.transport.worker import DocumentWorker

REFS = load_references("nvpf-synthetic")
ENERGIES = select_energies(REFS, 6)
SHAPE = (32, 32)

Docs = list[tuple[str, dict]]


# --------------------------------------------------------------------------- helpers


def _digest(child) -> str:
    try:
        data = child.read()
        raw = data.to_json().encode() if hasattr(data, "to_json") else np.ascontiguousarray(data).tobytes()
        return hashlib.sha256(raw).hexdigest()
    except Exception as exc:  # noqa: BLE001 - e.g. external data whose folder is gone
        return f"unreadable: {type(exc).__name__}"


def catalog_state(node, path: str = "", *, data_of: tuple[str, ...] = ()) -> dict[str, object]:
    """Every node below ``node``: path -> (family, metadata, structure, digest of the data of the
    nodes under the paths ``data_of``)."""
    state: dict[str, object] = {}
    for key, child in node.items():
        where = f"{path}/{key}"
        family = child.structure_family
        md = dict(child.metadata)
        if family == "container":
            state[where] = (family, md)
            state.update(catalog_state(child, where, data_of=data_of))
        else:
            digest = _digest(child) if where.startswith(data_of) and data_of else None
            state[where] = (str(family), md, repr(child.structure()), digest)
    return state


def without_result(state: dict[str, object], uid: str) -> dict[str, object]:
    """``state`` less the run's own result (and the results container, created with the first one)."""
    return {k: v for k, v in state.items() if k != "/phasestream" and not k.startswith(f"/phasestream/{uid}")}


def scan(client, *, seed: int = 1, energies=ENERGIES, i0_key: bool = True, references="nvpf-synthetic") -> Docs:
    """An honest scan: raw run into Tiled through TiledWriter; its documents returned."""
    sample = make_sample(SHAPE, state_of_charge=2.0, seed=seed, n_particles=2)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, i0=5000.0, seed=seed)
    RE = RunEngine({})
    RE.subscribe(raw_run_writer(client))
    docs: Docs = []
    RE(energy_stack_scan([det], energy, energies, sample=sample, references=references,
                         i0_key=det.i0_key if i0_key else None), lambda n, d: docs.append((n, copy.deepcopy(d))))
    return docs


def retarget(docs: Docs, uid: str | None = None, edit: Callable[[dict], None] | None = None,
             event: Callable[[dict], None] | None = None) -> Docs:
    """The documents of ``docs`` as they reach the worker after tampering: the start's uid (and every
    reference to it) replaced by ``uid``, the start changed by ``edit``, each event by ``event``."""
    old = docs[0][1]["uid"]
    new = uid if uid is not None else str(uuid.uuid4())
    out = []
    for name, doc in docs:
        doc = copy.deepcopy(doc)
        if name == "start":
            doc["uid"] = new
            if edit is not None:
                edit(doc)
        if doc.get("run_start") == old:
            doc["run_start"] = new
        if name == "event" and event is not None:
            event(doc)
        out.append((name, doc))
    return out


def feed(live, docs: Docs) -> None:
    for name, doc in docs:
        live(name, doc)
    live.callback.flush(60)


@pytest.fixture(scope="module")
def client(tiled_client):
    return tiled_client


@pytest.fixture(scope="module")
def honest(client) -> Docs:
    """An honest run: its raw run and its complete result are the target of the hostile documents."""
    docs = scan(client)
    service = LiveService(client, backend="numba", poll_seconds=0.05, stale_after=None)
    try:
        feed(service, docs)
    finally:
        service.close()
    assert client["phasestream"][docs[0][1]["uid"]].metadata["status"] == "complete"
    return docs


@pytest.fixture(scope="module")
def target(honest) -> tuple[str, ...]:
    uid = honest[0][1]["uid"]
    return (f"/{uid}", f"/phasestream/{uid}")


@pytest.fixture
def live(client):
    service = LiveService(client, backend="numba", poll_seconds=0.05, stale_after=None)
    yield service
    service.close()


def serves_a_good_scan(live, honest: Docs) -> None:
    docs = retarget(honest)
    feed(live, docs)
    md = live.client["phasestream"][docs[0][1]["uid"]].metadata
    assert md["status"] == "complete", md["errors"]


def result_md(client, uid: str) -> dict:
    return dict(client["phasestream"][uid].metadata)


# --------------------------------------------------------------------------- 1. identifiers


BAD_UIDS = {"dot-dot": "..", "dot": ".", "parent": "../escape", "slash": "a/b", "hidden": ".hidden",
            "5000-chars": "x" * 5000, "empty": "", "space": "with space", "int": 5}


def test_uid_that_is_not_a_plain_name_writes_and_deletes_nothing(client, honest, live, caplog, subtests, target):
    other = retarget(honest)
    feed(live, [other[0], other[-1]])  # a result exists that could be destroyed
    before = catalog_state(client, data_of=target)
    for case, uid in BAD_UIDS.items():
        with subtests.test(uid=case):
            caplog.clear()
            feed(live, retarget(honest, uid=uid))
            assert "run uid" in caplog.text and "refused" in caplog.text
    assert catalog_state(client, data_of=target) == before
    serves_a_good_scan(live, honest)


# --------------------------------------------------------------------------- 2. OD store paths


def test_od_store_path_traversal_is_refused(client, honest, detector_files, tmp_path, target):
    store = detector_files / "od-store"
    store.mkdir(exist_ok=True)
    outside = sorted(p for p in detector_files.rglob("*") if not p.is_relative_to(store))
    live = LiveService(client, backend="numba", poll_seconds=0.05, stale_after=None, od_store=store)
    try:
        before = catalog_state(client, data_of=target)
        for uid in ("../../escape", "../escape", "..", "/abs"):
            feed(live, retarget(honest, uid=uid))
        assert catalog_state(client, data_of=target) == before
        assert sorted(p for p in detector_files.rglob("*") if not p.is_relative_to(store)) == outside
        assert not (detector_files.parent / "escape").exists() and not (store.parent / "escape").exists()
        docs = retarget(honest)
        feed(live, docs)
        uid = docs[0][1]["uid"]
        assert result_md(client, uid)["status"] == "complete"
        assert (store / "phasestream" / uid / "od.zarr").is_dir()
    finally:
        live.close()


# --------------------------------------------------------------------------- 3. host files


def test_references_outside_the_configured_folders_are_refused_without_reading_them(client, honest, live, tmp_path,
                                                                                       caplog):
    fifo = tmp_path / "refs" / "pipe.csv"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    live.callback.reference_folders = (fifo.parent,)
    key = client.context.api_key
    for path in ("/proc/self/environ", "/dev/zero", "/etc/passwd", str(fifo), "../../etc/passwd"):
        docs = retarget(honest, edit=lambda start, p=path: start["phasestream"].__setitem__("references", p))
        done = threading.Thread(target=feed, args=(live, docs), daemon=True)
        done.start()
        done.join(30)
        assert not done.is_alive(), f"reading references {path} blocked the document thread"
        md = result_md(client, docs[0][1]["uid"])
        assert md["status"] == "failed" and "references" in md["errors"][0], md["errors"]
        assert key not in str(md)
    assert key not in caplog.text
    assert "root:" not in caplog.text  # no line of /etc/passwd
    serves_a_good_scan(live, honest)


def test_reference_file_inside_a_configured_folder_is_used(client, honest, live, tmp_path):
    folder = tmp_path / "refs"
    folder.mkdir()
    table = np.column_stack([REFS.energies, REFS.spectra.T])
    np.savetxt(folder / "nvpf.csv", table, delimiter=",", header="energy_eV," + ",".join(REFS.phases), comments="")
    live.callback.reference_folders = (folder,)
    docs = retarget(honest, edit=lambda start: start["phasestream"].__setitem__("references", "nvpf.csv"))
    feed(live, docs)
    md = result_md(client, docs[0][1]["uid"])
    assert md["status"] == "complete", md["errors"]
    assert md["references"]["phases"] == list(REFS.phases)


# --------------------------------------------------------------------------- 4. replayed documents


@pytest.mark.slow  # make test-stack
def test_replayed_start_and_stop_never_replace_a_result(client, honest, live, target):
    docs = retarget(honest)
    uid = docs[0][1]["uid"]
    feed(live, docs)
    target = (*target, f"/phasestream/{uid}")  # this result's arrays too, byte for byte
    before = catalog_state(client, data_of=target)
    assert before[f"/phasestream/{uid}"][1]["status"] == "complete"
    feed(live, [docs[0], docs[-1]])  # the same start and stop again
    feed(live, docs)  # and the whole run again
    after = catalog_state(client, data_of=target)
    assert without_result(after, uid) == without_result(before, uid)
    for key, value in before.items():
        if key.startswith(f"/phasestream/{uid}/"):
            assert after[key] == value, key  # every array as it was
    md = after[f"/phasestream/{uid}"][1]
    assert md["status"] == "complete"
    conflicts = [e for e in md["errors"] if "arrived again" in e]
    assert len(conflicts) == 2, md["errors"]
    for _ in range(MAX_CONFLICT_NOTES + 3):  # a flood of replays: noted a bounded number of times
        feed(live, [docs[0], docs[-1]])
    md = result_md(client, uid)
    assert sum("arrived again" in e for e in md["errors"]) == MAX_CONFLICT_NOTES
    assert md["status"] == "complete"
    serves_a_good_scan(live, honest)


def test_second_start_while_the_run_is_open_is_ignored(client, honest, live):
    docs = retarget(honest)
    uid = docs[0][1]["uid"]
    feed(live, docs[:3])
    feed(live, [docs[0]])
    feed(live, docs[3:])
    md = result_md(client, uid)
    assert md["status"] == "complete" and md["n_energies_seen"] == len(ENERGIES)
    assert any("arrived again" in e for e in md["errors"])


# --------------------------------------------------------------------------- 5. bounds


def test_num_points_beyond_the_bound_is_refused(client, honest, live, target):
    docs = retarget(honest, edit=lambda start: start.__setitem__("num_points", 10**6))
    before = catalog_state(client, data_of=target)
    feed(live, docs)
    uid = docs[0][1]["uid"]
    after = catalog_state(client, data_of=target)
    assert without_result(after, uid) == without_result(before, uid)
    md = result_md(client, uid)
    assert md["status"] == "failed" and "num_points 1000000" in md["errors"][0]
    assert list(client["phasestream"][uid]) == []  # no array was sized by it


def test_metadata_too_deep_or_too_large_is_refused_without_recursion(client, honest, live):
    deep: dict = {}
    node = deep
    for _ in range(1000):
        node["x"] = {}
        node = node["x"]
    arrays = {"name": "arrays", "blob": np.zeros(4_000_000)}  # as msgpack-numpy decodes it: its str is short
    deep_array = {"name": "deep-array", "blob": np.zeros((1,) * 40)}
    for sample in ({"name": "deep", "nested": deep}, {"name": "big", "blob": "x" * 200_000}, arrays, deep_array):
        docs = retarget(honest, edit=lambda start, s=sample: start.__setitem__("sample", s))
        feed(live, docs)
        md = result_md(client, docs[0][1]["uid"])
        assert md["status"] == "failed" and "'sample' block" in md["errors"][0], md["errors"]
        assert md["sample"] == {}
    docs = retarget(honest, edit=lambda start: start.__setitem__("sample", {"name": "small", "blob": np.arange(3.0)}))
    feed(live, docs)  # a small array is kept, as the list it is written as
    md = result_md(client, docs[0][1]["uid"])
    assert md["status"] == "complete" and md["sample"]["blob"] == [0.0, 1.0, 2.0], md


def test_image_unlike_the_descriptor_or_too_large_is_refused(client, honest):
    cb = PhaseMapCallback(client, backend="numba", bounds=DocumentBounds(max_image_pixels=16 * 16))
    docs = retarget(honest)
    for name, doc in docs:
        cb(name, doc)
    cb.flush(60)
    md = result_md(client, docs[0][1]["uid"])
    assert md["status"] == "failed"
    assert any(f"has {SHAPE[0] * SHAPE[1]} pixels, more than the 256 allowed" in e for e in md["errors"])
    cb.close()


# --------------------------------------------------------------------------- 7./8. true statuses


def test_failed_final_write_is_never_complete(client, honest, live, monkeypatch):
    real = ResultWriter.write_maps

    def failing(self, **kwargs):
        if "pcc" in kwargs:
            raise OSError("Tiled answered 500 Internal Server Error")  # what a restarting server did
        return real(self, **kwargs)

    monkeypatch.setattr(ResultWriter, "write_maps", failing)
    docs = scan(client, seed=21)  # its raw run is in Tiled, to recover from
    uid = docs[0][1]["uid"]
    feed(live, docs)
    live_result = live.callback.results[uid]
    assert live_result.status == "partial" and live_result.write_failed
    assert any("writing final maps to Tiled failed" in e for e in live_result.errors), live_result.errors
    assert any("result array pcc: missing" in e for e in live_result.errors), live_result.errors
    # the service recomputes it from the raw run; the writes fail again, and the result says so
    assert live.wait_recovered(uid, 120) == "partial"
    md = result_md(client, uid)
    assert md["status"] == "partial" and md["recovered"]["reason"] == "writing the result to Tiled failed"
    assert any("writing final maps to Tiled failed" in e for e in md["recovered"]["live_errors"])
    assert any("result array pcc: missing" in e for e in md["errors"]), md["errors"]
    monkeypatch.setattr(ResultWriter, "write_maps", real)
    serves_a_good_scan(live, honest)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
@pytest.mark.slow  # make test-stack
def test_full_od_store_makes_the_run_partial_with_one_error_and_a_count(client, detector_files):
    store = detector_files / "small-od-store"
    store.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(store)], check=True)
    live = LiveService(client, backend="numba", poll_seconds=0.05, stale_after=None, od_store=store)
    try:
        for seed in (11, 12):
            energies = select_energies(REFS, 12)
            docs = scan(client, seed=seed, energies=energies)  # raw run in Tiled
            uid = docs[0][1]["uid"]
            feed(live, docs)
            errors = live.callback.results[uid].errors
            od_errors = [e for e in errors if "OD planes" in e]
            assert live.callback.results[uid].status == "partial", errors
            assert any("No space left on device" in e for e in od_errors), errors
            assert len(od_errors) <= 2, errors  # the first failure, then a count, not one per plane
            # recomputed from the raw run, with the OD cube uploaded to Tiled's own storage
            assert live.wait_recovered(uid, 120) == "complete"
            md = result_md(client, uid)
            assert md["recovered"]["reason"] == "writing the result to Tiled failed"
            assert md["recovered"]["live_errors"] == errors
            assert client["phasestream"][uid]["od"].read().shape[0] == len(energies)
    finally:
        live.close()
        subprocess.run(["umount", str(store)], check=False)


# --------------------------------------------------------------------------- 9./10. final statuses


def _set_image(value):
    def event(doc):
        if "det_img" in doc["data"]:
            doc["data"]["det_img"] = value(doc["data"]["det_img"]) if callable(value) else value
    return event


@pytest.mark.parametrize(
    ("tamper", "status", "reason"),
    [
        ({"edit": lambda s: s["phasestream"].__setitem__("image_key", "nothing")}, "failed", "no data key 'nothing'"),
        ({"edit": lambda s: s["phasestream"].__setitem__("energy_key", "nothing")}, "failed", "no energy under"),
        ({"event": _set_image(np.zeros((2, *SHAPE)))}, "failed", "must be 2D"),
        ({"event": _set_image("not an image")}, "failed", "unfilled external reference"),
        ({"event": _set_image(lambda img: np.zeros_like(img))}, "failed", "every pixel's OD is masked"),
    ],
    ids=["image-key", "energy-key", "3-d-image", "string-image", "all-zero-frames"],
)
def test_run_that_analyses_nothing_ends_failed_with_the_reason(client, honest, live, tamper, status, reason):
    docs = retarget(honest, **tamper)
    feed(live, docs)
    md = result_md(client, docs[0][1]["uid"])
    assert md["status"] == status
    assert any(reason in e for e in md["errors"]), md["errors"]
    serves_a_good_scan(live, honest)


def test_single_energy_run_is_partial_with_the_reason(client, honest, live):
    docs = retarget(honest)
    first = next(i for i, (n, d) in enumerate(docs) if n == "event" and "det_img" in d["data"])
    feed(live, [d for i, d in enumerate(docs) if d[0] != "event" or i == first])
    md = result_md(client, docs[0][1]["uid"])
    assert md["status"] == "partial"
    assert any("only 1 energy analysed" in e for e in md["errors"]), md["errors"]


REFUSED_STARTS = {
    "no-references": (lambda s: s["phasestream"].pop("references"), "lacks references"),
    "empty-references": (lambda s: s["phasestream"].__setitem__("references", ""), "lacks references"),
    "mapping-references": (lambda s: s["phasestream"].__setitem__("references", {"a": 1}),
                           "phasestream.references must be a string"),
    "unknown-references": (lambda s: s["phasestream"].__setitem__("references", "no-such-set"), "references"),
    "mode": (lambda s: s["phasestream"].__setitem__("mode", "xyz"), "phasestream.mode must be one of"),
    "soc": (lambda s: s["sample"].__setitem__("state_of_charge", "abc"), "state_of_charge must be a finite number"),
    "sample-string": (lambda s: s.__setitem__("sample", "a string"), "'sample' must be a mapping"),
    "scan-id": (lambda s: s.__setitem__("scan_id", "seven"), "scan_id must be an integer"),
    "block-string": (lambda s: s.__setitem__("phasestream", "not a block"), "no 'phasestream' metadata block"),
}


@pytest.mark.slow  # make test-stack
def test_refused_start_document_gets_a_failed_result_with_the_reason(client, honest, live, subtests, target):
    before = catalog_state(client, data_of=target)
    uids = []
    for case, (edit, reason) in REFUSED_STARTS.items():
        with subtests.test(case=case):
            docs = retarget(honest, edit=edit)
            uids.append(docs[0][1]["uid"])
            feed(live, docs)
            md = result_md(client, uids[-1])
            assert md["status"] == "failed"
            assert md["errors"] and reason in md["errors"][0], md["errors"]
            assert md["errors"][0].startswith("start document refused")
    after = catalog_state(client, data_of=target)
    for uid in uids:  # each wrote its own failed result, nothing else
        after, before = without_result(after, uid), without_result(before, uid)
    assert after == before
    serves_a_good_scan(live, honest)


@pytest.mark.parametrize("exit_status", [np.array([1, 2]), ["success"], 5])
def test_a_stop_whose_exit_status_is_not_text_ends_the_run(client, honest, live, exit_status):
    """A stop with an array as ``exit_status`` (what msgpack-numpy decodes) raised after the run was closed: the
    result stayed ``running``, never recovered, never heartbeaten. It ends ``partial``, naming the field."""
    docs = retarget(honest)
    uid = docs[0][1]["uid"]
    docs[-1] = ("stop", {**docs[-1][1], "exit_status": exit_status})
    feed(live, docs)
    md = result_md(client, uid)
    assert md["status"] == "partial", md
    assert any("exit_status" in e and "is not text" in e for e in md["errors"]), md["errors"]
    assert uid not in live.callback.active
    serves_a_good_scan(live, honest)


def test_stopping_the_worker_finalizes_open_runs(client, honest):
    live = LiveService(client, backend="numba", poll_seconds=0.05, stale_after=None)
    docs = retarget(honest)
    feed(live, docs[:5])
    live.close()  # what SIGTERM does (phasestream serve)
    md = result_md(client, docs[0][1]["uid"])
    assert md["status"] == "partial"
    assert "worker stopped" in md["errors"]


@pytest.mark.slow  # make test-stack; its sibling below (writer gone) recovers a run through the same path
def test_result_left_running_by_a_dead_worker_is_recovered(client):
    docs = scan(client, seed=5)  # its raw run is complete in Tiled
    uid = docs[0][1]["uid"]
    dead = PhaseMapCallback(client, backend="numba")  # a worker killed mid-run: no close, no stop
    for name, doc in docs[:5]:
        dead(name, doc)
    dead.flush(60)
    assert result_md(client, uid)["status"] == "running"
    live = LiveService(client, backend="numba", poll_seconds=0.05, stale_after=0.0)
    try:
        assert live.wait_recovered(uid, 120) == "complete"
    finally:
        live.close()
    md = result_md(client, uid)
    assert md["status"] == "complete" and md["n_energies_seen"] == len(ENERGIES)
    assert md["recovered"]["reason"] == "worker restarted"


def test_result_whose_writer_is_gone_is_recovered_without_waiting(client):
    """A worker killed a moment ago: its result was updated just now, but the process it names as its writer is
    gone from this host. The next worker recovers it at once, not after the staleness limit (10 minutes here)."""
    docs = scan(client, seed=7)
    uid = docs[0][1]["uid"]
    dead = PhaseMapCallback(client, backend="numba")
    for name, doc in docs[:5]:
        dead(name, doc)
    dead.flush(60)
    child = subprocess.Popen(["true"])
    child.wait()  # its pid: a process of this host that has ended
    ResultWriter.open(client, uid).update_metadata(writer={**result_md(client, uid)["writer"], "pid": child.pid})
    live = LiveService(client, backend="numba", poll_seconds=0.05, stale_after=600.0)
    try:
        assert live.find_stale() == [uid]
        assert live.wait_recovered(uid, 120) == "complete"
    finally:
        live.close()
    assert result_md(client, uid)["recovered"]["reason"] == "worker restarted"


def _orphan_descriptor(live, uid: str) -> None:
    """One descriptor naming run ``uid``, through the worker's receiver and tracker (the start never seen)."""
    worker = DocumentWorker("tcp://127.0.0.1:1", live.callback, listener=live)
    doc = {"uid": str(uuid.uuid4()), "run_start": uid, "name": "primary", "time": time.time(), "data_keys": {}}
    worker.receiver.handle_message(pack_frame(b"", "descriptor", serialize([ENVELOPE_TAG, "someone", 1, doc])))


@pytest.mark.slow  # make test-stack
def test_a_document_naming_a_finished_run_never_replaces_its_result(client):
    """One descriptor naming an old run this worker never saw made it reprocess the run with ``replace``: an
    honest ``partial`` result was deleted and rewritten ``complete``, a person's notes gone, and ``recovered:
    documents lost`` written on it. A result that ended after its raw run's stop is left as it is."""
    docs = scan(client, seed=6)  # the raw run is complete in Tiled
    uid = docs[0][1]["uid"]
    first = LiveService(client, backend="numba", poll_seconds=0.05, stale_after=None)
    feed(first, [d for d in docs if not (d[0] == "event" and d[1]["seq_num"] > 4)])  # two events lost
    first.close()
    ResultWriter.open(client, uid).update_metadata(notes="reviewed: keep")
    before = catalog_state(client, data_of=(f"/phasestream/{uid}",))
    assert before[f"/phasestream/{uid}"][1]["status"] == "partial"
    live = LiveService(client, backend="numba", poll_seconds=0.05, stale_after=None, recover_after=600)
    try:
        _orphan_descriptor(live, uid)
        assert live.wait_recovered(uid, 60) == "left as it is: its result ended partial after the run's stop"
    finally:
        live.close()
    assert catalog_state(client, data_of=(f"/phasestream/{uid}",)) == before


def _stopped_mid_run_then_ended(client, seed: int, *, notes: str | None = None) -> str:
    """A run whose worker was stopped mid-run (its result ``partial``, "worker stopped", ``notes`` added by a
    person), whose raw run went on and stopped after the worker did; its uid."""
    sample = make_sample(SHAPE, state_of_charge=2.0, seed=seed, n_particles=2)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, i0=5000.0, seed=seed)
    docs: Docs = []
    RunEngine({})(energy_stack_scan([det], energy, ENERGIES, sample=sample, references="nvpf-synthetic",
                                    i0_key=det.i0_key), lambda n, d: docs.append((n, copy.deepcopy(d))))
    uid = docs[0][1]["uid"]
    raw = raw_run_writer(client)
    for name, doc in docs[:-1]:  # the run, as TiledWriter stores it while it goes on
        raw(name, doc)
    first = LiveService(client, backend="numba", poll_seconds=0.05, stale_after=None)
    feed(first, docs[:5])
    first.close()  # SIGTERM mid-run
    assert result_md(client, uid)["status"] == "partial"
    if notes is not None:
        ResultWriter.open(client, uid).update_metadata(notes=notes)
    time.sleep(0.1)
    raw("stop", {**docs[-1][1], "time": time.time()})  # the run ends after the worker stopped
    return uid


def test_a_run_that_went_on_after_its_worker_stopped_is_recovered(client):
    """A worker stopped mid-run (its result ``partial``, "worker stopped"); the run went on and the next worker
    got its later documents without the start: the result is older than the run's stop, so it is recovered."""
    uid = _stopped_mid_run_then_ended(client, seed=7)
    live = LiveService(client, backend="numba", poll_seconds=0.05, stale_after=None)
    try:
        _orphan_descriptor(live, uid)
        assert live.wait_recovered(uid, 120) == "complete"
    finally:
        live.close()
    md = result_md(client, uid)
    assert md["status"] == "complete" and md["n_energies_seen"] == len(ENERGIES) and "recovered" in md


@pytest.mark.slow  # make test-stack
def test_a_recovery_that_would_be_worse_keeps_the_partial_result(client):
    """A worker stopped mid-run left a ``partial`` result; the run went on, and the next worker, whose bounds refuse
    the raw run, recovers it: reprocessing gives ``failed``. The partial result, its arrays and a person's notes
    stay as they were, with no ``recovered`` note; the recovery says it left the result as it is, and why."""
    uid = _stopped_mid_run_then_ended(client, seed=9, notes="reviewed: keep")
    before = catalog_state(client, data_of=(f"/phasestream/{uid}",))
    live = LiveService(client, backend="numba", poll_seconds=0.05, stale_after=None,
                       bounds=DocumentBounds(max_num_points=len(ENERGIES) - 1))
    try:
        _orphan_descriptor(live, uid)
        outcome = live.wait_recovered(uid, 120)
    finally:
        live.close()
    assert outcome.startswith("left as it is: ") and "failed" in outcome and "where it is partial" in outcome, outcome
    assert catalog_state(client, data_of=(f"/phasestream/{uid}",)) == before


def test_a_recovered_run_meets_the_bounds_of_the_worker(client):
    """The worker's bounds (``serve --max-num-points``) held for the documents it got but not when it recovered
    a run from the raw run: reprocessing used the default bounds. A recovered run meets the worker's own."""
    docs = scan(client, seed=8)
    uid = docs[0][1]["uid"]
    dead = PhaseMapCallback(client, backend="numba")  # a worker with the default bounds, killed mid-run
    for name, doc in docs[:5]:
        dead(name, doc)
    dead.flush(60)
    assert result_md(client, uid)["status"] == "running"
    live = LiveService(client, backend="numba", poll_seconds=0.05, stale_after=0.0,
                       bounds=DocumentBounds(max_num_points=len(ENERGIES) - 1))
    try:
        assert live.wait_recovered(uid, 120) == "failed"
    finally:
        live.close()
    md = result_md(client, uid)
    assert md["status"] == "failed" and f"num_points {len(ENERGIES)}" in md["errors"][0], md["errors"]


# --------------------------------------------------------------------------- 12. memory


def test_worker_keeps_summaries_not_arrays(client, honest):
    live = LiveService(client, backend="numba", poll_seconds=0.05, stale_after=None, max_results=2)
    try:
        uids = []
        for _ in range(3):
            docs = retarget(honest)
            feed(live, docs)
            uids.append(docs[0][1]["uid"])
        assert list(live.callback.results) == uids[1:]
        for uid in uids[1:]:
            result = live.callback.results[uid]
            assert result.status == "complete" and result.arrays == {}
            assert result.metadata["phase_fractions"]
    finally:
        live.close()
