"""Fixtures for the simulated-beamline tests: a RunEngine and a schema-validating runner."""

import pytest
from bluesky import RunEngine
from event_model import DocumentNames, schema_validators


@pytest.fixture
def RE():
    return RunEngine({})


@pytest.fixture
def run():
    """``run(RE, plan)`` -> the run's (name, doc) list, each validated against the event-model schema."""

    def run(RE, plan):
        docs = []
        RE(plan, lambda name, doc: docs.append((name, doc)))
        for name, doc in docs:
            schema_validators[DocumentNames[name]].validate(doc)
        return docs

    return run
