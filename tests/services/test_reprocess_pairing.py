"""Reprocessing pairs each image with its own row (energy, I0) by seq_num, and refuses what it cannot pair.

Raw runs are written by real RunEngines through TiledWriter into a real Tiled (embedded, and on
PostgreSQL when it is installed); tampered runs (rows out of order, a row lost, a duplicated
seq_num, a frame lost) are built with real Tiled writes. The oracle is a PhaseMapCallback fed the
documents the RunEngine emitted, in memory, with nothing read back from Tiled.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

import httpx
import numpy as np
import pandas as pd
import pyarrow
import pytest
from bluesky import RunEngine
from services_support import postgres_bin, private_postgres, uvicorn_port
from tiled.structures.core import Spec

from phasestream.callbacks.phase_map import PhaseMapCallback
from phasestream.jobs.raw_documents import RawRunMismatchError, raw_run_documents
from phasestream.jobs.reprocess import ReprocessOptions, reprocess_run
from phasestream.references import load_references, select_energies
from phasestream.sim import TransmissionDetector, energy_stack_scan, make_energy, make_sample
from phasestream.store.tiled import connect, open_raw_run, raw_run_writer

ENERGIES = select_energies(load_references("nvpf-synthetic"), 4)  # 5 energies
FLOAT_MAPS = ("pcc",)
EXACT_MAPS = ("phase",)  # the final answer; pcc carries reliability and ambiguity


def _plain(value):
    """Tiled metadata (DictView, ListView) as plain dicts and lists, to write it again."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def _scan(client, *, mode: str, soc: float, seed: int, documents: list | None = None) -> tuple[str, dict]:
    """One energy stack written to Tiled by TiledWriter; the live (oracle) maps from the emitted documents."""
    RE = RunEngine({}, context_managers=[])  # no SIGINT handler: it may run outside the main thread
    RE.subscribe(raw_run_writer(client))
    live = PhaseMapCallback(None, backend="numpy")
    RE.subscribe(live)
    if documents is not None:
        RE.subscribe(lambda name, doc: documents.append((name, doc)))
    sample = make_sample((40, 40), state_of_charge=soc, seed=seed, n_particles=2)
    energy = make_energy()
    det = TransmissionDetector(sample, energy, mode=mode, i0=6000.0, seed=seed)
    i0_key = det.i0_key if mode == "stxm" else None
    (uid,) = RE(energy_stack_scan([det], energy, ENERGIES, sample=sample, mode=mode, i0_key=i0_key))
    assert live.flush(60)
    live.close()
    result = live.results[uid]
    assert result.status == "complete", result.errors
    assert sample.accuracy(result.arrays["phase"]) > 0.9  # the live maps agree with the simulator's truth
    return uid, dict(result.arrays)


def _oracle(documents: list, *, drop: set[tuple[str, int]] = frozenset()) -> dict:
    """Maps from emitted documents, leaving out the events ``(stream, seq_num)`` in ``drop``."""
    cb = PhaseMapCallback(None, backend="numpy")
    streams = {}
    for name, doc in documents:
        if name == "descriptor":
            streams[doc["uid"]] = doc["name"]
        if name == "event" and (streams[doc["descriptor"]], doc["seq_num"]) in drop:
            continue
        cb(name, doc)
    assert cb.flush(60)
    cb.close()
    (result,) = cb.results.values()
    return dict(result.arrays)


def _assert_maps_equal(client, uid: str, expected: dict) -> None:
    result = client["phasestream"][uid]
    for key in EXACT_MAPS:
        np.testing.assert_array_equal(result[key].read(), expected[key], err_msg=key)
    for key in FLOAT_MAPS:
        np.testing.assert_allclose(result[key].read(), expected[key], atol=1e-6, equal_nan=True, err_msg=key)


def _reprocess(client, uid: str):
    return reprocess_run(client, uid, ReprocessOptions(backend="numpy", replace=True))


def _read_raw(client, uid: str) -> dict:
    """Start, stop and, per stream, its metadata, table (sorted by seq_num) and arrays, as TiledWriter stored them."""
    run = open_raw_run(client, uid)
    streams = {}
    for stream in run:
        parts = run[stream].base
        table = parts["internal"].read().sort_values("seq_num", ignore_index=True)
        arrays = {key: (parts[key].read(), _plain(parts[key].metadata)) for key in parts if key != "internal"}
        streams[stream] = (_plain(run[stream].metadata), table, arrays)
    return {"start": _plain(run.metadata["start"]), "stop": _plain(run.metadata["stop"]), "streams": streams}


def _primary_only(tamper):
    """``tamper(table, frames)`` applied to the primary stream, the other streams left as they are."""
    def apply(stream, table, frames):
        return tamper(table, frames) if stream == "primary" else (table, frames)
    return apply


def _partial_copy(client, raw: dict, uid: str, tag: str, tamper):
    """Reprocess a tampered copy of ``raw`` (uid ending in ``tag``); it must end ``partial``."""
    copy = _copy_run(client, raw, uid[:-4] + tag, tamper=tamper)
    result = _reprocess(client, copy)
    assert result.status == "partial", result.errors
    return copy, result


def _copy_run(client, raw: dict, new_uid: str, tamper=None) -> str:
    """A raw run read by :func:`_read_raw`, written again under ``new_uid`` in TiledWriter's layout.

    ``tamper(stream, table, frames)`` may return another table (rows in another order, rows left out
    or added) and other frames ``{data key: array}``; the rows are written in the order given.
    """
    start = {**raw["start"], "uid": new_uid}
    stop = {**raw["stop"], "run_start": new_uid}
    dst = client.create_container(key=new_uid, metadata={"start": start, "stop": stop},
                                  specs=[Spec("BlueskyRun", version="3.0")])
    for stream, (metadata, table, arrays) in raw["streams"].items():
        frames = {key: array for key, (array, _) in arrays.items()}
        if tamper is not None:
            table, frames = tamper(stream, table, frames)
        node = dst.create_container(key=stream, metadata=metadata,
                                    specs=[Spec("BlueskyEventStream", version="3.0"), Spec("composite")]).base
        for key, array in frames.items():
            node.write_array(array, key=key, metadata=arrays[key][1])
        rows = pyarrow.Table.from_pandas(table, preserve_index=False)
        node.create_appendable_table(schema=rows.schema, key="internal").append_partition(0, rows)
    return new_uid


# --------------------------------------------------------------------------- two writers at once


def _two_writers_at_once(uri: str) -> None:
    """Two RunEngines in two threads write two runs to one Tiled at once; each reprocesses to its live maps."""
    outcomes: dict[str, tuple[str, dict]] = {}
    errors: list[BaseException] = []
    go = threading.Barrier(2)

    def scan(name: str, mode: str, soc: float, seed: int) -> None:
        try:
            client = connect(uri)  # a client per thread, as two beamline processes would have
            go.wait(30)
            outcomes[name] = _scan(client, mode=mode, soc=soc, seed=seed)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=scan, args=("a", "txm", 1.0, 5)),
               threading.Thread(target=scan, args=("b", "stxm", 2.5, 6))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors, errors
    client = connect(uri)
    for uid, live in outcomes.values():
        result = _reprocess(client, uid)
        assert result.status == "complete", result.errors
        _assert_maps_equal(client, uid, live)


@pytest.mark.slow  # make test-stack: keeps make test under 15 minutes
def test_two_runengines_at_once_reprocess_to_the_live_maps(tiled_server):
    _two_writers_at_once(tiled_server.uri)


@pytest.fixture
def postgres_tiled(tmp_path):
    """Tiled on PostgreSQL (catalog and event tables), served by a `tiled serve config` subprocess."""
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (.ci/ensure-services.sh installs the Debian package)")
    key = "pairing" + secrets.token_hex(8)
    (tmp_path / "data").mkdir()
    with private_postgres() as pg:
        config = tmp_path / "tiled.yml"
        config.write_text(
            "authentication:\n"
            f"  single_user_api_key: {key}\n"
            "  allow_anonymous_access: false\n"
            "catalog:\n"
            f"  uri: {pg.replace('postgresql://', 'postgresql+asyncpg://')}\n"
            "  init_if_not_exists: true\n"
            "  writable_storage:\n"
            f"    - {tmp_path / 'data'}\n"
            f"    - {pg}\n"
        )
        log = (tmp_path / "tiled.log").open("w")
        proc = subprocess.Popen([sys.executable, "-m", "tiled", "serve", "config", str(config),
                                 "--host", "127.0.0.1", "--port", "0"], stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{uvicorn_port(tmp_path / 'tiled.log', proc)}"  # the port it bound
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, (tmp_path / "tiled.log").read_text()
                try:
                    if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "tiled.log").read_text()
                time.sleep(0.2)
            yield f"{base}/api/v1?api_key={key}"
        finally:
            proc.terminate()
            proc.wait(20)
            log.close()


@pytest.mark.slow  # make test-stack: keeps make test under 15 minutes
def test_two_runengines_at_once_on_postgresql(postgres_tiled):
    _two_writers_at_once(postgres_tiled)


# --------------------------------------------------------------------------- tampered runs


@pytest.fixture(scope="module")
def recorded(tiled_client):
    """A TXM run (dark, flat and primary streams) in Tiled, with the documents the RunEngine emitted."""
    documents: list = []
    uid, live = _scan(tiled_client, mode="txm", soc=1.5, seed=3, documents=documents)
    return uid, live, documents, _read_raw(tiled_client, uid)


def _permute(stream, table, frames):
    order = np.random.default_rng(1).permutation(len(table))
    if len(table) > 1 and (order == np.arange(len(table))).all():
        order = order[::-1]
    return table.iloc[order], frames


def test_rows_out_of_seq_num_order_reprocess_to_the_same_maps(tiled_client, recorded):
    uid, live, _, raw = recorded
    copy = _copy_run(tiled_client, raw, uid[:-4] + "0b0b", tamper=_permute)
    seq = open_raw_run(tiled_client, copy)["primary"]["seq_num"].read()
    assert list(seq) != sorted(seq)  # Tiled returns the rows in the order they were written
    result = _reprocess(tiled_client, copy)
    assert result.status == "complete", result.errors
    _assert_maps_equal(tiled_client, copy, live)


def test_a_lost_row_ends_partial_without_mispaired_pixels(tiled_client, recorded):
    uid, _, documents, raw = recorded

    @_primary_only
    def lose_row(table, frames):
        return table[table["seq_num"] != 3], frames

    copy, result = _partial_copy(tiled_client, raw, uid, "0c0c", lose_row)
    (error,) = [e for e in result.errors if "num_events" in e]
    n = len(ENERGIES)
    assert "'primary'" in error and f"num_events is {n}, Tiled has {n - 1} rows" in error and "[3]" in error, error
    assert tiled_client["phasestream"][copy].metadata["status"] == "partial"
    # the six other images keep their own energies: the maps of the run without event 3
    _assert_maps_equal(tiled_client, copy, _oracle(documents, drop={("primary", 3)}))


def test_a_duplicated_seq_num_with_other_values_is_left_out(tiled_client, recorded):
    uid, _, documents, raw = recorded

    @_primary_only
    def duplicate(table, frames):
        other = table[table["seq_num"] == 2].copy()
        other["energy"] += 7.0  # which energy is seq_num 2's? unknown: left out
        retried = table[table["seq_num"] == 4]  # the same row twice (a retried append): harmless
        return pd.concat([table.iloc[:2], other, table.iloc[2:], retried]), frames

    copy, result = _partial_copy(tiled_client, raw, uid, "0d0d", duplicate)
    assert any("'primary'" in e and "seq_num 2 has 2 rows" in e for e in result.errors), result.errors
    assert not any("seq_num 4" in e or "num_events" in e for e in result.errors), result.errors
    _assert_maps_equal(tiled_client, copy, _oracle(documents, drop={("primary", 2)}))


def test_a_lost_frame_refuses_the_stream(tiled_client, recorded):
    uid, _, _, raw = recorded

    @_primary_only
    def lose_frame(table, frames):
        return table, {key: np.delete(array, 3, axis=0) for key, array in frames.items()}

    copy = _copy_run(tiled_client, raw, uid[:-4] + "0e0e", tamper=lose_frame)
    message = f"'primary': {len(ENERGIES) - 1} frames of 'det_img' but {len(ENERGIES)} events"
    with pytest.raises(RawRunMismatchError, match=message):  # no pairing is better than a shifted one
        list(raw_run_documents(open_raw_run(tiled_client, copy)))
    result = _reprocess(tiled_client, copy)
    assert result.status == "failed"  # no primary image could be paired
    assert any(message in e for e in result.errors), result.errors


@pytest.mark.parametrize(("counts", "tag"), [({"primary": 10**12}, "1a1a"), ({"primary": "seven", "dark": -1}, "1b1b"),
                                           ("all of them", "1c1c")])
def test_num_events_that_are_not_counts_are_not_used(tiled_client, recorded, counts, tag):
    """A stop document's num_events is a count per stream from the network: 10**12 built a set of that many
    integers (the reprocess, or the worker's recovery thread, ran until the OOM killer), a string raised. Such a
    count is reported and not used; the rows pair with their frames by seq_num, as the live maps did."""
    uid, live, _, raw = recorded
    stop = raw["stop"]
    tampered = {**raw, "stop": {**stop, "num_events": counts if isinstance(counts, str)
                                else {**stop["num_events"], **counts}}}
    copy = _copy_run(tiled_client, tampered, uid[:-4] + tag)
    result = _reprocess(tiled_client, copy)
    assert result.status == "partial", result.errors
    expected = ["the stop document's num_events is not a map"] if isinstance(counts, str) else [
        f"stream {stream!r}: the run's num_events {n!r} is not a count" for stream, n in counts.items()]
    for text in expected:
        assert any(text in e for e in result.errors), (text, result.errors)
    _assert_maps_equal(tiled_client, copy, live)
