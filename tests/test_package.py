"""Importing the package turns on PyTorch's huge pages for CPU tensors, unless the environment says."""

import os
import subprocess
import sys

import pytest

SHOW = "import nanogpt_lightning, os; print(os.environ['THP_MEM_ALLOC_ENABLE'])"


@pytest.mark.parametrize("given, expected", [(None, "1"), ("0", "0"), ("1", "1")])
def test_huge_pages_default_on_and_the_environment_wins(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given
    result = subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == expected
