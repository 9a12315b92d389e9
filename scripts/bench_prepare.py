"""Time preparation against tiktoken's own batch encoding: `python scripts/bench_prepare.py [--interrupt-after 60]`.

A 100 MB text and a 1 GB folder of 100 files by default; see `--help` and docs/data.md."""

import sys

from nanogpt_lightning.errors import exit_on_user_error
from nanogpt_lightning.tools.bench_prepare import main

if __name__ == "__main__":
    exit_on_user_error(main)(sys.argv[1:])
