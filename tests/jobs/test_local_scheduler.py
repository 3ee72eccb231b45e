"""``--scheduler local`` starts a LocalCluster in this process, whatever scheduler is configured.

``serve --scheduler local`` (``DaskExecutor``) and ``train gmvae --scheduler local`` passed None to
``dask_client``, which then connected to ``$PHASESTREAM_DASK_SCHEDULER``, set whenever the env file that
``phasestream up`` writes is sourced: "local" meant the stack's scheduler.
"""

from __future__ import annotations

import pytest

from phasestream.jobs.cluster import DEFAULT_SCHEDULER_ENV
from phasestream.jobs.executors import DaskExecutor
from phasestream.jobs.training import _spectra_on_dask

NOWHERE = "tcp://127.0.0.1:9"  # the discard port: no scheduler answers there


@pytest.fixture
def configured_elsewhere(monkeypatch):
    monkeypatch.setenv(DEFAULT_SCHEDULER_ENV, NOWHERE)


@pytest.mark.parametrize("name", ["local", "LOCAL"])
def test_the_executor_of_scheduler_local_is_a_local_cluster(configured_elsewhere, name):
    executor = DaskExecutor(name, "http://127.0.0.1:9/api/v1", n_workers=1)
    try:
        assert type(executor.client.cluster).__name__ == "LocalCluster"
        assert executor.address != NOWHERE
    finally:
        executor.close()


def test_training_extraction_with_scheduler_local_is_a_local_cluster(configured_elsewhere):
    assert _spectra_on_dask([], "http://127.0.0.1:9/api/v1", "phasestream", "local", 0, None) == []
