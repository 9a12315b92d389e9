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


# The files whose tests take longest (script processes, several at once), longest first.
# pytest-xdist (--dist loadfile) hands out whole files in collection order, so these start first and the two
# workers end close together instead of one waiting while the other runs a long file last.
LONGEST_FIRST = ("test_bench.py", "test_multinode.py", "test_sweeps.py", "test_scaling.py", "test_readme.py",
                 "test_train.py", "test_errors.py", "test_finish.py", "test_foreign.py", "test_interrupt.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
