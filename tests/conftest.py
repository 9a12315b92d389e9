"""Shared fixtures and process settings; the helpers the tests import are in tests/helpers/."""

import os

import pytest

from helpers import SONNETS

# the tests run two at a time (pytest-xdist) and often two scripts each: one thread per process keeps the
# cores from being oversubscribed (idle OpenMP threads spin), and the tiny models gain nothing from more
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def sonnets_text() -> str:
    return SONNETS.read_text()
